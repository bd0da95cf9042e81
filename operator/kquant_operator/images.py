"""Container image references as the container runtime resolves them, and the operator's
allowlist patterns (KQUANT_ALLOWED_IMAGES) matched against them part by part: registry
host, each path component, tag, digest. A ``*`` never crosses a ``/``, so
``registry.example.com/kquant/*`` admits no image of another registry or repository (a
pattern matched as one string let ``*/kquant/job:*``-like globs reach ``evil.io/...``:
operator trial).

Grammar and normalisation from github.com/distribution/reference (``reference.go``,
``normalize.go``): the first component is a registry host when it holds ``.`` or ``:``, is
``localhost`` (in a pattern too: a glob there makes no host, so ``kquant-*/worker`` is
Docker Hub's, not ``kquant-x.evil.com``'s: review); otherwise the image is on
``docker.io``, and a one-component name there is an official image under ``library/``.
Hosts are lower case (a capital one is refused: containerd's per-host mirror and TLS
settings are looked up as written). A glob in a host matches across its dots:
``*.dkr.ecr.*.amazonaws.com`` admits every AWS account's registry. An image naming a tag and
a digest is pulled by its digest, so a pattern with a tag admits it only when the pattern
names that digest too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

DEFAULT_REGISTRY = "docker.io"
_DOMAIN_COMPONENT = r"(?:[a-z0-9]|[a-z0-9][a-z0-9-]*[a-z0-9])"
# fullmatch, ASCII classes only: ``$`` let a trailing newline through, ``\w`` other digits
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-f:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}  # distribution's algorithms
MAX_NAME = 255  # characters of the name (registry and path), as reference.go allows


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference: ``registry`` (lower case, ``docker.io`` by default), ``path``
    components (``("library", "python")``), ``tag`` and ``digest`` (``sha256:<hex>``), each
    None when absent."""

    registry: str
    path: tuple[str, ...]
    tag: str | None = None
    digest: str | None = None


def _split(text: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of ``name[:tag][@digest]``; a ``:`` before the last ``/`` is a
    registry port, not a tag."""
    name, at, digest = text.partition("@")
    colon = name.rfind(":")
    tag = None
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, (digest if at else None)


def _registry_and_path(name: str) -> tuple[str, tuple[str, ...]]:
    first, slash, rest = name.partition("/")
    host = bool(slash) and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    registry, path = (first, rest) if host else (DEFAULT_REGISTRY, name)
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"  # docker.io/python too, as distribution normalises
    return registry, tuple(path.split("/"))


def parse_image(text: str) -> ImageRef:
    """Parse an image reference (``python:3.11``, ``ghcr.io/kquant/kquant-job:0.1.0``,
    ``registry:5000/a/b@sha256:<64 hex>``). Raises ValueError saying which part is
    malformed (blanks, capitals in a path, an empty tag, a digest that is not
    ``algorithm:hex``)."""
    name, tag, digest = _split(text)
    if not name:
        raise ValueError("a name is required")
    registry, path = _registry_and_path(name)
    if len(registry) + 1 + len("/".join(path)) > MAX_NAME:
        raise ValueError(f"the name is longer than {MAX_NAME} characters")
    if not _DOMAIN.fullmatch(registry):
        raise ValueError(f"registry {registry!r} is not a lower-case host[:port]")
    bad = [c for c in path if not _PATH_COMPONENT.fullmatch(c)]
    if bad:
        raise ValueError(f"path component {bad[0]!r} is not lower-case [a-z0-9._-]")
    if tag is not None and not _TAG.fullmatch(tag):
        raise ValueError(f"tag {tag!r} is not [A-Za-z0-9_.-], at most 128 characters")
    if digest is not None:
        algorithm, _, hexa = digest.partition(":")
        size = DIGEST_HEX.get(algorithm)
        if size is None or len(hexa) != size or not re.fullmatch(r"[0-9a-f]+", hexa):
            raise ValueError(f"digest {digest!r} is not sha256, sha384 or sha512:<hex>")
    return ImageRef(registry, path, tag, digest)


def parse_pattern(text: str) -> ImageRef:
    """Parse an allowlist pattern: an image reference whose parts may hold fnmatch globs
    (``*``, ``?``, ``[...]``), each within its part. No tag and no digest: any tag or
    digest. Raises ValueError for an empty part (``a//b``, ``a:``)."""
    name, tag, digest = _split(text)
    registry, path = _registry_and_path(name)
    if not name or "" in path or tag == "" or digest == "":
        raise ValueError(f"{text!r}: an empty part")
    if registry != registry.lower():
        raise ValueError(f"{text!r}: registry hosts are lower case (as images must name them)")
    return ImageRef(registry, path, tag, digest)


def image_matches(image: ImageRef, pattern: ImageRef) -> bool:
    """Whether ``image`` falls under ``pattern``: the same registry host, as many path
    components, each part matching its glob (case-sensitive; hosts are lower case), the
    tag matching the pattern's tag (an image named without tag or digest is ``latest``),
    and the digest equal to the pattern's when it names one."""
    # a host's [ is an IPv6 address's, not a glob's class
    if not fnmatchcase(image.registry, pattern.registry.replace("[", "[[]")):
        return False
    if len(image.path) != len(pattern.path):
        return False
    if not all(fnmatchcase(c, p) for c, p in zip(image.path, pattern.path, strict=True)):
        return False
    if pattern.digest is not None:
        return image.digest == pattern.digest
    if pattern.tag is not None:
        if image.digest is not None:  # pulled by the digest: its tag is not what runs
            return False
        return fnmatchcase(image.tag or "latest", pattern.tag)
    return True


def same_image(a: ImageRef, b: ImageRef) -> bool:
    """Whether two references name the same image (``python:3.11`` and
    ``docker.io/library/python:3.11``); no tag counts as ``latest``."""

    def key(ref: ImageRef) -> tuple:
        tag = ref.tag if ref.tag is not None or ref.digest else "latest"
        return (ref.registry, ref.path, tag, ref.digest)

    return key(a) == key(b)
