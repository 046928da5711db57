"""Bundled demo corpus: Jane Austen's six completed novels.

``demo_corpus.txt.gz`` is a gzip-compressed, UTF-8 plain-text corpus with
``\\n`` newlines, of about 4.0 MB (4,021,062 characters) uncompressed. It holds
the full texts of *Sense and Sensibility* (1811), *Pride and Prejudice* (1813),
*Mansfield Park* (1814), *Emma* (1815), *Northanger Abbey* (1818) and
*Persuasion* (1818), in that order. The novels are in the public domain. The
text was taken from the Debian package ``r-cran-janeaustenr`` 1.0.0-1
(MIT-licensed), which took it from Project Gutenberg. No Project Gutenberg
header, footer or licence text is included. See ``README.md`` in this
directory for provenance, licensing and the processing steps.

The corpus is meant for small demos, for example training a tiny
character-level language model on a CPU.
"""

from __future__ import annotations

import gzip
import pathlib
from importlib import resources

__all__ = ["NOVEL_SEPARATOR", "demo_corpus_path", "load_demo_corpus", "load_demo_novels"]

_CORPUS_FILENAME = "demo_corpus.txt.gz"
NOVEL_SEPARATOR = "\n\n\n\n"  # between two novels of the corpus


def demo_corpus_path() -> pathlib.Path:
    """Return the filesystem path of the gzip-compressed demo corpus.

    Returns:
        Path to ``demo_corpus.txt.gz`` inside the installed ``nsa_hf.data``
        package.

    Raises:
        FileNotFoundError: If the corpus file is missing from the installation.
    """
    resource = resources.files(__name__).joinpath(_CORPUS_FILENAME)
    path = pathlib.Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"demo corpus not found at {path}")
    return path


def load_demo_corpus() -> str:
    """Read and decompress the demo corpus.

    Returns:
        The whole corpus as one ``str`` (UTF-8 decoded, ``\\n`` newlines).
    """
    resource = resources.files(__name__).joinpath(_CORPUS_FILENAME)
    with resource.open("rb") as fh, gzip.open(fh, "rt", encoding="utf-8", newline="") as text:
        return text.read()


def load_demo_novels() -> list[str]:
    """The six novels of the demo corpus, in order (*Persuasion*, the last, is the one examples hold out)."""
    return load_demo_corpus().split(NOVEL_SEPARATOR)
