"""`acd-verify BUNDLE`: check every file of an export bundle against the SHA-256 its manifest records.

Run it after copying a bundle to a server or pulling it from storage: it names the first file that
is missing or differs, and exits 2 (0 when every file matches). Torch-free.

>>> main(["smollm2-acd"])  # doctest: +SKIP
ok: smollm2-acd (5 files, 541.2 MB, SHA-256 match the manifest)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontrast.bundle import read_manifest
from autocontrast.cli_support import command_parser, run_cli


def parser() -> argparse.ArgumentParser:
    p = command_parser(prog="acd-verify", description=__doc__.split("\n\n>>>")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory made by acd-export")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(args.bundle)
    manifest = read_manifest(root, verify=True)
    size = sum((root / name).stat().st_size for name in manifest.files)
    print(f"ok: {root} ({len(manifest.files)} files, {size / 1e6:.1f} MB, SHA-256 match the manifest)")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
