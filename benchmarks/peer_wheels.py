"""The pure-Python peers of the GPU check (``benchmarks/gpu_peers.txt``) on a machine that may lack them: which to
install from the wheel folder, and, once installed, whether their requirements are met and everything imports.

    python benchmarks/peer_wheels.py missing benchmarks/gpu_peers.txt   # the pins this interpreter lacks
    PYTHONPATH=SITE python benchmarks/peer_wheels.py check SITE          # requirements and imports

``check`` exits 1 when an import fails or when ``fused_gates`` is not the copy installed in SITE (a checkout's
``fused_gates/`` on ``sys.path`` would shadow it, and it has no ``fused_gates.kernels``); unmet version
requirements are printed but do not fail by themselves: the imports decide.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import traceback
from pathlib import Path

# What the GPU check imports: the package (kernels and the TRL trainer included) and the peers' entry points; TRL's
# backward imports trl.trainer.utils, which imports datasets.
IMPORTS = ("fused_gates", "fused_gates.kernels", "trl", "trl.trainer.utils", "trl.kernels.chunked_logprob",
           "datasets", "liger_kernel.chunked_loss", "pytest_benchmark", "fused_gates.integrations.trl")


def _pins(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def missing(peers: Path) -> int:
    from packaging.requirements import Requirement

    for pin in _pins(peers):
        requirement = Requirement(pin)
        try:
            present = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            print(pin)
            continue
        note = "" if requirement.specifier.contains(present, prereleases=True) else f" (the pin is {pin}: kept)"
        print(f"present: {requirement.name} {present}{note}", file=sys.stderr)
    return 0


def _unmet_requirements(site: Path) -> list[str]:
    from packaging.requirements import Requirement

    unmet = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                version = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} {dist.version} requires {text}: not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} {dist.version} requires {text}: {version} installed")
    return unmet


def check(site: Path) -> int:
    status = 0
    installed = sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions(path=[str(site)]))
    print(f"installed in {site}: {', '.join(installed) or 'nothing'}")
    for line in _unmet_requirements(site):
        print(f"requirement not met (the imports below decide whether it matters): {line}")
    for module in IMPORTS:
        try:
            imported = importlib.import_module(module)
        except Exception:  # report every failing import, not just the first
            status = 1
            print(f"import {module}: FAILED\n{traceback.format_exc(limit=3)}")
            continue
        where = getattr(imported, "__file__", None) or "?"
        print(f"import {module}: ok ({where})")
        if module == "fused_gates" and not Path(where).resolve().is_relative_to(site.resolve()):
            status = 1
            print(f"fused_gates comes from {where}, not from {site}: a checkout on sys.path shadows the install "
                  "(run with python -P, or from another folder)")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("missing").add_argument("peers", type=Path)
    sub.add_parser("check").add_argument("site", type=Path)
    args = parser.parse_args()
    return missing(args.peers) if args.command == "missing" else check(args.site)


if __name__ == "__main__":
    sys.exit(main())
