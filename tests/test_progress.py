"""What mmjax-train prints: the live bar on a terminal, the unchanged lines elsewhere, the summary."""

import io
import logging
import os
import re
import subprocess
import sys
import time

import jax
import pytest

from mmjax import progress, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The periodic line as it was before the progress bar existed; CI logs and tests/test_resume.py read it.
OLD_LINE = re.compile(r"^step (\d+)/(\d+) \| loss \S+ \| lr \S+ \| examples_per_sec \S+ \| tflops_per_device \S+"
                      r" \| eval_time_share \S+ \| checkpoint_time_share \S+ \| eta \d+h\d\dm\d\ds$")


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _fake_run(console: progress.Progress, total: int = 10, log_every: int = 5, others: bool = True) -> None:
    with console:
        console.start(0)
        for step in range(1, total + 1):
            time.sleep(0.01)
            console.advance(step)
            if step % log_every == 0:
                console.log(step, {"loss": 2.5 / step, "lr": 1e-3, "examples_per_sec": 1234.5}, 0.2, train.LOG_KEYS)
            if step == log_every:
                console.write(f"eval @ {step}: top1 0.1000")
            if step == log_every and others:  # what other modules print or log meanwhile
                print("a checkpoint note printed by someone else")
                logging.getLogger("mmjax.checkpoint").warning("a checkpoint warning")


def test_lines_mode_prints_the_old_lines_when_not_a_tty():
    out = io.StringIO()  # isatty() is False: as in CI, pods and pipes
    console = progress.Progress(10, 32, stream=out)
    assert console.mode == "lines"
    _fake_run(console)
    assert out.getvalue() == (
        "step 5/10 | loss 0.5 | lr 0.001 | examples_per_sec 1234 | eta 0h00m01s\n"
        "eval @ 5: top1 0.1000\n"
        "step 10/10 | loss 0.25 | lr 0.001 | examples_per_sec 1234 | eta 0h00m00s\n")


def test_bar_on_a_tty_shows_step_loss_rate_and_eta_and_keeps_messages_off_it(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in mmjax-train (pytest adds its own)
    out = FakeTTY()
    console = progress.Progress(10, 32, stream=out)
    assert console.mode == "bar"
    _fake_run(console)
    text = out.getvalue()
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    assert "\n" not in text.split("eval @")[0], "the bar is redrawn in place, not printed line by line"
    assert not any(OLD_LINE.match(f) or f.startswith("step 5/10 |") for f in frames)
    last = [f for f in frames if f.startswith("step 10/10")][-1]
    assert re.fullmatch(r"step 10/10 100%\|[^|]{20}\| loss 0\.25 \| 1\.23k ex/s \| ETA 0h00m00s *", last), last
    assert any(re.fullmatch(r"step 5/10 +50%\|[^|]{20}\| loss 0\.5 \| 1\.23k ex/s \| ETA 0h00m01s *", f)
               for f in frames), frames
    # Messages go on lines of their own: the bar is wiped first ("\r   \r") and redrawn after.
    for message in ("eval @ 5: top1 0.1000", "a checkpoint note printed by someone else"):  # print() too
        assert re.search(r"\r +\r" + re.escape(message) + r"\n\rstep 5/10", text), message
    captured = capsys.readouterr()
    assert captured.out == ""
    # Console logging keeps its stream (stderr), but the bar is wiped around it and redrawn after.
    assert captured.err == "a checkpoint warning\n" and re.search(r"\r +\r\rstep 5/10", text)
    assert logging.getLogger().handlers == []  # given back


def test_console_logging_handlers_keep_their_format_and_stream_under_the_bar(capsys, monkeypatch):
    handler = logging.StreamHandler(sys.stdout)  # e.g. logging.basicConfig(stream=sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    out = FakeTTY()
    _fake_run(progress.Progress(10, 32, stream=out))
    assert capsys.readouterr().out == "WARNING:mmjax.checkpoint: a checkpoint warning\n"
    assert re.search(r"\r +\r\rstep 5/10", out.getvalue()), "the bar is wiped for the record"
    assert logging.getLogger().handlers == [handler]


def test_the_bar_gives_back_stdout_and_logging_when_the_run_fails():
    root_handlers = list(logging.getLogger().handlers)
    stdout = sys.stdout
    with pytest.raises(RuntimeError), progress.Progress(10, 32, mode="bar", stream=FakeTTY()) as console:
        console.start(0)
        raise RuntimeError("non-finite loss")
    assert sys.stdout is stdout and logging.getLogger().handlers == root_handlers


def test_mode_from_flag_environment_and_terminal(monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert progress.resolve_mode(None, FakeTTY()) == "bar"
    assert progress.resolve_mode(None, io.StringIO()) == "lines"
    assert progress.resolve_mode("lines", FakeTTY()) == "lines"
    assert progress.resolve_mode("bar", io.StringIO()) == "bar"
    monkeypatch.setenv(progress.ENV_VAR, "lines")
    assert progress.resolve_mode(None, FakeTTY()) == "lines"
    assert progress.resolve_mode("bar", FakeTTY()) == "bar"  # the flag wins over the environment
    monkeypatch.setenv(progress.ENV_VAR, "fancy")
    with pytest.raises(ValueError, match="MMJAX_PROGRESS"):
        progress.resolve_mode(None, FakeTTY())
    monkeypatch.delenv(progress.ENV_VAR)
    monkeypatch.setenv("TERM", "dumb")
    assert progress.resolve_mode(None, FakeTTY()) == "lines"
    _, _, args = train.parse_args(["--config", "experiments/vit/shapes.py", "--workdir", "w", "--progress", "bar"])
    assert args.progress == "bar"
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "experiments/vit/shapes.py", "--workdir", "w", "--progress", "fancy"])


def test_summary_has_final_metrics_checkpoint_and_load_and_export_commands(tmp_path):
    workdir = str(tmp_path / "run")
    for name in ("2", "10", "12.orbax-checkpoint-tmp", "9"):
        os.makedirs(os.path.join(workdir, "checkpoints", name))
    out = io.StringIO()
    console = progress.Progress(12, 32, stream=out)
    console.log(12, {"loss": 0.125, "examples_per_sec": 800.0}, 0.1, train.LOG_KEYS)
    text = console.summary(workdir, {"top1": 0.71875, "retrieval/i2t_r1": 0.5}, 4, 12)
    assert text and out.getvalue() == "step 12/12 | loss 0.125 | examples_per_sec 800 | eta 0h00m00s\n" + text + "\n"
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines()[1:-1])
    assert rows["steps"] == "12/12 (resumed at 4)"
    assert rows["top1"] == "0.7188" and rows["retrieval/i2t_r1"] == "0.5000" and rows["train loss"] == "0.125"
    assert rows["checkpoint"] == os.path.join(workdir, "checkpoints", "10")
    assert rows["load"] == f'mmjax.load("{workdir}")'
    assert rows["export (mmjax)"] == f"mmjax-convert --input {workdir} --output MODEL_DIR"
    assert rows["export (other)"] == f"mmjax-convert --to <target> --input {workdir} --output OUT"
    assert "timm" in rows["<target>"] and "hf" in rows["<target>"]
    spaced = progress.Progress(1, 1, stream=io.StringIO()).summary(str(tmp_path / "my run"), {}, 0, 1)
    assert f"--input '{tmp_path / 'my run'}' --output" in spaced and "none written" in spaced


@pytest.mark.parametrize("stream", [io.StringIO, FakeTTY])
def test_only_process_zero_prints(monkeypatch, capsys, tmp_path, stream):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    out = stream()
    console = progress.Progress(10, 32, stream=out)
    _fake_run(console, others=False)
    assert console.summary(str(tmp_path), {"top1": 0.5}, 0, 10) == ""
    assert out.getvalue() == "" and capsys.readouterr().out == ""


def test_trainer_without_a_tty_prints_the_old_lines_and_a_summary(shapes_vit_run):
    """The session's shapes ViT run (tests/conftest.py), trained in-process with stdout not a terminal."""
    workdir = shapes_vit_run.workdir
    lines = shapes_vit_run.stdout.splitlines()
    assert "\r" not in "".join(lines)
    logged = [line for line in lines if line.startswith("step ")]
    assert [OLD_LINE.match(line).group(1, 2) for line in logged] == [("2", "4"), ("4", "4")], logged
    assert any(line.startswith("first step (compile + run) took ") for line in lines)
    assert any(re.fullmatch(r"eval @ 4: top1 \d\.\d{4}", line) for line in lines)
    summary = "\n".join(lines[next(i for i, line in enumerate(lines) if "mmjax-train summary" in line):])
    assert re.search(r"^  top1 +\d\.\d{4}$", summary, re.M)
    assert os.path.join(workdir, "checkpoints", "4") in summary
    assert f'mmjax.load("{workdir}")' in summary
    assert f"mmjax-convert --input {workdir} --output MODEL_DIR" in summary


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_mmjax_train_on_a_terminal_shows_the_live_bar(tmp_path):
    import pty

    workdir = str(tmp_path / "vit")
    primary, secondary = pty.openpty()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TERM="xterm")
    env.pop(progress.ENV_VAR, None)
    # The smoke ViT's 4 steps (an evaluation at step 2 to see the bar wiped and redrawn around its
    # line), made cheaper where the bar does not care: a batch of one example per simulated
    # device, an evaluation of 8 examples in one batch (not 64 padded to 504), one checkpoint.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmjax.train", "--config", "experiments/vit/shapes.py:smoke=True",
         "--config.evals.every_steps=2", "--config.input.batch_size=8", "--config.evals.top1.max_examples=8",
         "--config.evals.top1.batch_size=8", "--config.checkpoint.every_steps=4", "--workdir", workdir],
        cwd=REPO, env=env, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    text = b"".join(chunks).decode(errors="replace")
    frames = [f.strip() for f in re.split(r"[\r\n]", text) if f.strip()]
    assert not any(OLD_LINE.match(f) for f in frames), "a terminal gets the bar, not the periodic lines"
    bars = [f for f in frames if re.match(r"step \d/4 +\d+%\|", f)]
    assert any(re.fullmatch(r"step 4/4 100%\|█+\| loss \d\.\d+ \| \d+(\.\d+)?k? ex/s \| ETA 0h00m00s", f)
               for f in bars), bars
    assert re.search(r"\r +\reval @ 2: top1 \d\.\d{4}\r\n\rstep 2/4", text), text  # wiped, printed, redrawn
    assert "mmjax-train summary" in text and f'mmjax.load("{workdir}")' in text
    assert f"mmjax-convert --to <target> --input {workdir} --output OUT" in text
