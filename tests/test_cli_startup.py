"""The command line starts without importing what it does not run."""

import importlib
import subprocess
import sys

from cryoprior.cli.main import COMMANDS, SUMMARIES, build_parser


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_help_and_version_import_no_command_and_no_torch():
    mods = _imported_after("from cryoprior.cli.main import build_parser; build_parser()")
    assert "torch" not in mods
    assert not any(m.startswith("cryoprior.cli.") and m != "cryoprior.cli.main" for m in mods)
    rc = subprocess.run([sys.executable, "-m", "cryoprior.cli.main", "--help"], capture_output=True, text=True)
    assert rc.returncode == 0 and "relion-external" in rc.stdout


def test_relion_external_imports_neither_the_other_commands_nor_sklearn():
    mods = _imported_after("from cryoprior.cli.main import build_parser; build_parser('relion-external')")
    assert "cryoprior.cli.relion_external" in mods
    others = {f"cryoprior.cli.{m}" for m in COMMANDS.values()} - {"cryoprior.cli.relion_external"}
    assert not (mods & others)
    assert not {"sklearn", "matplotlib", "gemmi", "faiss"} & mods


def test_summaries_are_the_modules_first_docstring_lines():
    for name, module in COMMANDS.items():
        doc = importlib.import_module(f"cryoprior.cli.{module}").__doc__.strip().splitlines()[0]
        assert SUMMARIES[name] == doc, name


def test_every_command_parses_its_own_help():
    parser = build_parser(all_commands=True)
    for name in COMMANDS:
        try:
            parser.parse_args([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, name


def test_every_bench_names_a_module_with_run():
    from cryoprior.cli.bench import BENCHES

    for name, (module, _, _) in BENCHES.items():
        assert callable(importlib.import_module(f"cryoprior.bench.{module}").run), name


def test_bench_startup_reports_ratios_to_import_torch():
    from cryoprior.bench.startup import run

    result = run(repeats=1)
    assert result["ratio_to_import_torch"]["import torch (baseline)"] == 1.0
    assert all(s > 0 for s in result["seconds"].values())
