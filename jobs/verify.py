"""``python -m jobs.verify URI``: exit 0 when the stage output at URI is finished and intact.

What a chart's ``helm test`` pod runs: the manifest is there and every file it lists is
present with its recorded size (``--checksums`` also downloads them and checks sha256).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from jobs.contract import download_finished, require_finished
from jobs.errors import StageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.verify", description=__doc__.splitlines()[0]
    )
    parser.add_argument("uri")
    parser.add_argument("--checksums", action="store_true", help="download and check every file")
    args = parser.parse_args(argv)
    try:
        if args.checksums:
            with tempfile.TemporaryDirectory() as tmp:
                manifest = download_finished(args.uri, Path(tmp))
        else:
            manifest = require_finished(args.uri)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"{args.uri}: finished {manifest.stage} output, {len(manifest.files)} files, "
        f"at {manifest.finished_at}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
