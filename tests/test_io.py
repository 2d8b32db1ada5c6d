"""File writing (`fmnist.io`): atomic, and readable by others as far as the umask allows."""

import stat
import subprocess
import sys
import textwrap


def modes(*paths) -> dict[str, str]:
    """The permission bits of every file under the paths, as octal strings, by name."""
    found = {}
    for path in paths:
        for p in [path] if path.is_file() else path.rglob("*"):
            if p.is_file():
                found[str(p.relative_to(path.parent))] = oct(stat.S_IMODE(p.stat().st_mode))
    return found


def test_atomic_writes_follow_the_umask(tmp_path):
    """mkstemp makes 0600 files; the atomic writes give them 0666 less the umask, like open()."""
    script = textwrap.dedent(f"""
        from fmnist.io import atomic_open, write_json
        write_json({str(tmp_path / 'a.json')!r}, {{"x": 1}})
        with atomic_open({str(tmp_path / 'b.bin')!r}) as f:
            f.write(b"data")
    """)
    for umask, expected in ((0o027, "0o640"), (0o022, "0o644"), (0o077, "0o600")):
        subprocess.run([sys.executable, "-c", script], check=True, umask=umask)
        assert set(modes(tmp_path / "a.json", tmp_path / "b.bin").values()) == {expected}, oct(umask)


COMMANDS = """
import sys
from fmnist import report
from fmnist.cli import main
from fmnist.report import Rung

real = report.ladder  # the ladder's first two rungs, a few steps each
report.ladder = lambda quick, best: [
    Rung(r.name, r.change, r.overrides | {"steps": 4, "epochs": None, "batch_size": 16, "val_size": 32})
    for r in real(quick, best)[:2]]
for command in sys.argv[1:]:  # one process for the four commands: torch loads once
    code = main(command.split())
    if code:
        sys.exit(code)
"""


def test_train_plot_export_and_report_write_files_others_can_read(shared_synthetic_dir, tmp_path):
    """Under umask 022 every file of the run, the plots, the ONNX file and the report is 0644."""
    data, run = shared_synthetic_dir, tmp_path / "run"
    commands = [f"train --data-dir {data} --steps 4 --batch-size 16 --val-size 32 --out {run} --quiet",
                f"plot --model {run} --data-dir {data}",
                f"export --model {run} --out {tmp_path / 'model.onnx'}",
                f"report --quick --quiet --data-dir {data} --out {tmp_path / 'ladder'}"]
    result = subprocess.run([sys.executable, "-c", COMMANDS, *commands], capture_output=True, text=True,
                            umask=0o022)
    assert result.returncode == 0, result.stderr
    written = modes(run, tmp_path / "model.onnx", tmp_path / "ladder")
    for name in ("model.safetensors", "model.json", "config.json", "last.pt", "cost.png", "samples.png"):
        assert written[f"run/{name}"] == "0o644"
    assert written["model.onnx"] == "0o644"
    assert written["ladder/report.md"] == written["ladder/ladder_loss.png"] == "0o644"
    assert set(written.values()) == {"0o644"}, written
