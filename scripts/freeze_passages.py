"""Write ``mmllm eval``'s held-out text passages (``mmllm/toyworld/passages/``) from a Python's ``pydoc_data``.

``mmllm eval`` measures text retention on a frozen set of passages shipped in the package, so that the figure
does not depend on the Python it runs on (each Python version ships other ``pydoc_data`` topics). The shipped
set was written by this script run with CPython 3.11.7 (stdlib only; the Python that runs it is the one whose
topics and licence are read)::

    python3.11 scripts/freeze_passages.py            # (a CPython 3.11.7) rewrite heldout.txt and NOTICE
    python3.11 scripts/freeze_passages.py --check    # write nothing: exit 1 unless the shipped files are these

The paragraphs are those ``mmllm eval`` used to take from the running Python's ``pydoc_data.topics``: the topics in sorted key order joined by blank lines, split at blank lines, each paragraph of at least
40 words that does not start with a space (prose, not a code sample or grammar rule), stripped. ``heldout.txt``
holds every such paragraph, in that order, separated by one blank line (UTF-8, ending in a newline). A file
written by another Python holds other paragraphs: ``mmllm eval`` then needs its new sha256
(``mmllm.toyworld.model_eval.PASSAGES_SHA256``), and its text figures compare only with others on that file.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PASSAGES = REPO / "mmllm" / "toyworld" / "passages"
MIN_WORDS = 40
PSF_START = "B. TERMS AND CONDITIONS FOR ACCESSING OR OTHERWISE USING PYTHON"
PSF_END = "BEOPEN.COM LICENSE AGREEMENT FOR PYTHON 2.0"


def select_paragraphs(topics: dict[str, str]) -> list[str]:
    """The prose paragraphs of ``topics``: at least ``MIN_WORDS`` words, not starting with a space, in order."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return [p.strip() for p in text.split("\n\n") if len(p.split()) >= MIN_WORDS and not p.startswith(" ")]


def passages_text(paragraphs: list[str]) -> str:
    """``heldout.txt``'s text: the paragraphs separated by one blank line, ending in a newline."""
    bad = [k for k, p in enumerate(paragraphs) if "\n\n" in p or p != p.strip() or "\r" in p]
    if bad:
        raise ValueError(f"paragraphs {bad[:5]} hold a blank line, a carriage return or surrounding "
                         "whitespace: they would not read back as one paragraph each")
    return "\n\n".join(paragraphs) + "\n"


def psf_license(license_file: Path) -> str:
    """The PSF License Version 2 section of a CPython ``LICENSE.txt`` (its terms' preface and the agreement)."""
    text = license_file.read_text(encoding="utf-8")
    start, end = text.find(PSF_START), text.find(PSF_END)
    if start < 0 or end < start:
        raise SystemExit(f"{license_file}: no section from {PSF_START!r} to {PSF_END!r}; give the LICENSE.txt "
                         "of the CPython whose topics are read with --license")
    return text[start:end].rstrip() + "\n"


def notice_text(version: str, sha256: str, count: int, license_text: str) -> str:
    """``NOTICE``: where ``heldout.txt`` comes from, what was changed, and the licence it is under."""
    return f"""\
heldout.txt: {count} paragraphs of the Python {version} documentation
=======================================================================

Source: CPython {version}, Lib/pydoc_data/topics.py (the "topics" dictionary: the text of the
language reference topics shown by pydoc/help()).
Copyright (c) Python Software Foundation; All Rights Reserved (the notice in full: clause 2 below).
Licensed under the Python Software Foundation License Version 2 (below).

Changes made (the summary asked by clause 3 of the licence): the topics were joined in sorted key
order and split into paragraphs at blank lines; only the paragraphs of at least {MIN_WORDS} words that
do not start with a space are kept, stripped of surrounding whitespace, in order, separated by one
blank line. The text of each paragraph is unchanged.

scripts/freeze_passages.py in the mmllm repository writes this file and heldout.txt
(sha256 {sha256}) from the Python that runs it.

mmllm uses these paragraphs only as held-out text for `mmllm eval`'s perplexity measurement.

-----------------------------------------------------------------------
The following is from CPython {version}'s LICENSE.txt.

{license_text}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PASSAGES, help="folder for heldout.txt and NOTICE")
    parser.add_argument("--license", type=Path, default=Path(sysconfig.get_path("stdlib")) / "LICENSE.txt",
                        help="this Python's LICENSE.txt (default: beside its standard library)")
    parser.add_argument("--check", action="store_true", help="write nothing: exit 1 if the files in --out differ")
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    version = platform.python_version()
    text = passages_text(select_paragraphs(topics)).encode("utf-8")
    sha256 = hashlib.sha256(text).hexdigest()
    count = text.decode("utf-8").count("\n\n") + 1
    notice = notice_text(version, sha256, count, psf_license(args.license)).encode("utf-8")
    files = {args.out / "heldout.txt": text, args.out / "NOTICE": notice}
    if args.check:
        differ = [str(path) for path, data in files.items() if not path.is_file() or path.read_bytes() != data]
        print(f"Python {version}: {count} paragraphs, sha256 {sha256}; "
              + (f"differ: {', '.join(differ)}" if differ else "the files in --out are these"))
        return 1 if differ else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        path.write_bytes(data)
    print(f"wrote {args.out}: {count} paragraphs of Python {version}'s pydoc_data topics, sha256 {sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
