"""Publishing sets of artifacts to a prefix: immutable set folders, one conditional manifest
write, fixed-name copies kept in step, and only kquant's own objects ever replaced or
removed. :class:`Target` is the entry point; :mod:`kquant_job.sets.layout` documents the
layout."""

from kquant_job.sets.layout import MANIFEST, REPORT, Retention, Writer
from kquant_job.sets.publish import PublishedSet, Target, as_prefix

__all__ = ["MANIFEST", "REPORT", "PublishedSet", "Retention", "Target", "Writer", "as_prefix"]
