"""The fault suite: refused inputs and SIGKILLs at random moments, on a tiny colour project.

For each of ingest, extract, train, finetune, evaluate and `tlflow run`: an input the stage
refuses (one line, nothing written), then 5 SIGKILLs at seeded random moments of a run that
moves the project from the last good version (A) to a new one (B: three images more per
class). After every kill, every output file is byte-identical to A's or B's (a feature
store, appended in place, must hold only committed rows whose codes are B's); a killed
`tlflow run` leaves no process behind (its temporary Prefect server included). Then 5
seeded SIGINTs and SIGTERMs to `tlflow run`'s process group (a terminal's Ctrl-C, `docker
stop`): exit 130 / 143 within 10 s of the signal, one `interrupted:` line, no traceback, no
process left, every output A's or B's. Then:

- a kill between the two files of a model pair: the next reader refuses the pair;
- flipped bytes in a store's codes: `tlflow features verify` and extract refuse in one line;
  deleting the store and rerunning extract repairs it;
- paths in params at the project root, an ancestor, another configured path: refused before
  anything is written;
- a full disk (a 1 MiB tmpfs over features/, where this machine allows mounting one): extract
  ends in one line, no segfault, the store as it was;
- the next uninterrupted `tlflow run` ends with `dvc status` clean and B's metrics, bytes
  for bytes.

    python bench/faults.py [--seed 0] [--kills 5] [--keep]

Prints a table (case, kills, result, seconds) and the totals; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import cli_env, colour_project, write_image  # noqa: E402

KILLED = ("ingest", "extract", "train", "finetune", "evaluate")
FINETUNE = {"enabled": True, "epochs": 2, "warmup_epochs": 0.0, "batch_size": 16}


@dataclass
class Case:
    name: str
    kills: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Suite:
    """The project, its two good versions (A and B) and the checks between them."""

    def __init__(self, base: Path, seed: int) -> None:
        self.base, self.rng = base, random.Random(seed)
        self.project = colour_project(base, finetune=FINETUNE)
        self.env = cli_env(base)  # no PREFECT_API_URL: `tlflow run` starts its own server
        self.cases: list[Case] = []
        self.stage_seconds: dict[str, float] = {}

    # ------------------------------------------------------------ running

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[Case]:
        case = Case(name)
        t0 = time.perf_counter()
        try:
            yield case
        except Exception as err:
            case.problems.append(f"{type(err).__name__}: {err}")
        case.seconds = time.perf_counter() - t0
        self.cases.append(case)
        print(f"  {name}: {'ok' if not case.problems else case.problems}", file=sys.stderr,
              flush=True)

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["tlflow", *args], cwd=self.project, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def in_process(self, name: str) -> None:
        """A stage run to completion in this process (torch imported once), then recorded in
        dvc.lock as `tlflow run` records it."""
        from tlflow.flows.stages import commit, stage_runner
        from tlflow.tasks.lib.core.params import load_params

        with _cwd(self.project), contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            stage_runner(name)(load_params())
            self.stage_seconds[name] = time.perf_counter() - t0
            commit(name)

    def refused(self, case: Case, run: Callable[[], str], touched: set[str] = frozenset()
                ) -> None:
        """`run` must fail with one line (its text returned), writing nothing but `touched`."""
        before = self.outputs()
        message = run()
        if "\n" in message.strip() or not message.strip():
            case.problems.append(f"not one line: {message.strip()[:300]!r}")
        after = self.outputs()
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        if changed - touched:
            case.problems.append(f"a refusal changed {sorted(changed - touched)}")

    def stage_refusal(self, name: str) -> str:
        from tlflow.flows.stages import stage_runner
        from tlflow.tasks.lib.core.errors import TlflowError
        from tlflow.tasks.lib.core.params import load_params

        with _cwd(self.project), contextlib.redirect_stdout(sys.stderr):
            try:
                stage_runner(name)(load_params())
            except TlflowError as err:
                return str(err)
        return ""  # not refused: `refused` reports the empty line

    # ------------------------------------------------------------ what the outputs are

    def outputs(self) -> dict[str, str]:
        """sha256 of every output file (base.paths), relative to the project; a feature store
        by its committed content (it is appended in place)."""
        from tlflow.tasks.lib.core.params import load_params

        if not hasattr(self, "_paths"):  # read once: some cases make params.yaml invalid
            with _cwd(self.project):
                self._paths = list(load_params().base.paths)
        out = {}
        for key, value in self._paths:
            if key in ("hash_cache", "finetune_checkpoints", "report"):
                continue  # caches, and the HTML report every `tlflow run` rewrites
            p = self.project / value
            files = [p.with_name(p.name + s) for s in (".safetensors", ".json")] \
                if key in ("head", "finetuned") else [p]
            for f in files:
                for g in sorted(f.rglob("*")) if f.is_dir() else [f]:
                    if g.is_file() and not g.name.endswith(".lock"):
                        rel = g.relative_to(self.project).as_posix()
                        out[rel] = _store_digest(g) if g.suffix == ".h5" else _sha(g)
        return out

    def check_old_or_new(self, case: Case, a: dict[str, str], b: dict[str, str],
                         b_codes: dict[str, dict]) -> None:
        for rel, digest in self.outputs().items():
            if rel.endswith(".h5"):
                bad = _committed_not_in(self.project / rel, b_codes.get(rel, {}))
                if bad:
                    case.problems.append(f"{rel}: {bad}")
            elif digest not in (a.get(rel), b.get(rel)):
                case.problems.append(f"{rel} is neither the last good version nor the new one")

    # ------------------------------------------------------------ kills

    def kill_at(self, args: list[str], moment: float) -> set[int]:
        """Start `tlflow ARGS`, SIGKILL it `moment` seconds in (or let it end first); the
        processes it had started."""
        proc = subprocess.Popen(["tlflow", *args], cwd=self.project, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        born = _watch(proc, moment)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return born


def _cwd(path: Path) -> contextlib.AbstractContextManager:
    return contextlib.chdir(path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _codes(path: Path) -> dict[str, tuple]:
    from tlflow.tasks.lib.features.store import FeatureStore

    with FeatureStore(path) as fs:
        keys = fs.keys()
        return {layer: dict(zip(keys, map(bytes, fs.read(layer, keys)), strict=True))
                for layer in fs.layers}


def _store_digest(path: Path) -> str:
    try:
        codes = _codes(path)
    except Exception:  # a damaged store (the flipped-bytes case): its bytes stand for it
        return "damaged:" + _sha(path)
    return hashlib.sha256(json.dumps({layer: sorted((k, hashlib.sha256(v).hexdigest())
                                                    for k, v in rows.items())
                                      for layer, rows in codes.items()}).encode()).hexdigest()


def _committed_not_in(path: Path, reference: dict) -> str:
    """What is wrong with a store against the complete one (layer -> key -> code bytes)."""
    try:
        codes = _codes(path)
    except Exception as err:
        return f"unreadable after the kill ({err})"
    for layer, rows in codes.items():
        for key, code in rows.items():
            if reference.get(layer, {}).get(key) != code:
                return f"row {key[:12]} of {layer} differs from an uninterrupted run's"
    return ""


def _watch(proc: subprocess.Popen, moment: float) -> set[int]:
    """Wait `moment` seconds (or until `proc` ends), collecting the processes it starts."""
    born, deadline = set(), time.monotonic() + moment
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            born |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        time.sleep(0.05)
    return born


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


def _set_params(project: Path, edit: Callable[[dict], None]) -> str:
    path = project / "params.yaml"
    text = path.read_text()
    raw = yaml.safe_load(text)
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return text


# ---------------------------------------------------------------- the suite


def build_versions(s: Suite) -> tuple[dict, dict, dict, Path]:
    """A: the project run once; B: three images more per class. Returns A's and B's output
    digests, B's store codes, and a copy of the project as A left it."""
    from tests.conftest import COLOURS
    from tlflow.flows.stages import STAGES

    for name in STAGES:  # every stage, as `tlflow run` runs them
        s.in_process(name)
    a = s.outputs()
    snapshot_a = s.base / "project-A"
    shutil.copytree(s.project, snapshot_a, symlinks=True)
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12, 15):
            write_image(s.base / "src" / name / f"{i:02d}.png", colour, seed=100 * c + i)
    for name in STAGES:  # every stage, as `tlflow run` runs them
        s.in_process(name)
    b = s.outputs()
    b_codes = {rel: _codes(s.project / rel) for rel in b if rel.endswith(".h5")}
    shutil.copytree(s.project, s.base / "project-B", symlinks=True)
    _restore(s, snapshot_a)
    return a, b, b_codes, snapshot_a


def _restore(s: Suite, snapshot: Path) -> None:
    shutil.rmtree(s.project)
    shutil.copytree(snapshot, s.project, symlinks=True)


def refusals(s: Suite, name: str) -> tuple[Callable[[], str], Callable[[], None], set[str]]:
    """Each stage's refused input: (provoke and run, undo, outputs the provocation itself
    touches)."""
    p = s.project
    if name == "ingest":
        link = s.base / "src" / "red" / "elsewhere.png"

        def provoke() -> str:
            link.symlink_to(s.base / "project-A" / "params.yaml")
            return s.stage_refusal(name)
        return provoke, lambda: link.unlink(), set()
    if name == "extract":
        return (lambda: _flip_and_refuse(s), lambda: _repair_store(s), set(_stores(s)))
    if name == "train":
        pointer = p / "features" / "current.json"
        saved = pointer.read_bytes()

        def provoke_train() -> str:
            pointer.unlink()
            return s.stage_refusal(name)
        return provoke_train, lambda: pointer.write_bytes(saved), {"features/current.json"}
    if name == "finetune":
        stranger = p / ".tlflow" / "finetune" / "notes.txt"

        def provoke_ft() -> str:
            shutil.rmtree(stranger.parent, ignore_errors=True)
            stranger.parent.mkdir(parents=True)
            stranger.write_text("not tlflow's")
            return s.stage_refusal(name)
        return provoke_ft, lambda: shutil.rmtree(stranger.parent), set()
    head = p / "models" / "head.safetensors"
    saved_head = head.read_bytes()

    def provoke_eval() -> str:
        head.write_bytes(saved_head[: len(saved_head) // 2])
        return s.stage_refusal(name)
    return provoke_eval, lambda: head.write_bytes(saved_head), {"models/head.safetensors"}


def _stores(s: Suite) -> list[str]:
    return [f.relative_to(s.project).as_posix() for f in (s.project / "features").glob("*.h5")]


def _flip_and_refuse(s: Suite) -> str:
    """Flip bytes inside the codes of the store; verify and extract must both refuse."""
    import h5py

    (store,) = [s.project / r for r in _stores(s)]
    with h5py.File(store, "r") as h5:
        ds = h5["layers/pooled"]
        offset = ds.id.get_chunk_info(0).byte_offset
    data = bytearray(store.read_bytes())
    for i in range(64):  # not 0xFF: Fletcher-32 sums 16-bit words mod 65535, so a zero word
        data[offset + 100 + i] ^= 0x5A  # flipped to 0xFFFF is invisible to it (found here)
    store.write_bytes(bytes(data))
    verify = s.cli("features", "verify")
    if verify.returncode != 2 or "damaged" not in verify.stderr:
        return f"verify did not refuse: {verify.returncode} {verify.stderr}\n(two lines)"
    return s.stage_refusal("extract")


def _repair_store(s: Suite) -> None:
    """The repair the refusal names: delete the store, rerun extract."""
    for rel in _stores(s):
        (s.project / rel).unlink()
    s.in_process("extract")
    verify = s.cli("features", "verify")
    if verify.returncode != 0:
        raise AssertionError(f"the repaired store fails verify: {verify.stderr}")


def run_stage_cases(s: Suite, a: dict, b: dict, b_codes: dict, kills: int) -> None:
    for name in KILLED:
        with s.case(f"{name}: refused input") as case:
            provoke, undo, touched = refusals(s, name)
            try:
                s.refused(case, provoke, touched)
            finally:
                undo()
        with s.case(f"{name}: SIGKILL") as case:
            window = 6.0 + 1.5 * s.stage_seconds.get(name, 1.0)  # start-up + the work
            for _ in range(kills):
                s.kill_at(["stage", name], s.rng.uniform(0.5, window))
                case.kills += 1
                s.check_old_or_new(case, a, b, b_codes)
            s.in_process(name)  # the next run completes it
            now = s.outputs()
            for rel in now:
                if rel.startswith(WRITES[name]) and now[rel] != b.get(rel):
                    case.problems.append(f"{rel} after recovery differs from an "
                                         "uninterrupted run's")


WRITES = {  # what each killed stage writes, by path prefix (the recovery check)
    "ingest": ("data/",),
    "extract": ("features/", "reports/extract", "metrics/extract"),
    "train": ("models/head", "models/train_choice", "metrics/probe", "reports/probe",
              "reports/strategy"),
    "finetune": ("models/finetuned", "plots/finetune"),
    "evaluate": ("metrics/eval", "plots/per_class", "plots/confusion"),
}


def run_pair_case(s: Suite, snapshot_a: Path) -> None:
    with s.case("kill between a model pair's files") as case:
        for f in ("head.safetensors", "head.json"):
            shutil.copy2(snapshot_a / "models" / f, s.project / "models" / f)
        code = ("import os, signal, tlflow.tasks.lib.core.files as f\n"
                "real = os.replace\n"
                "def replace(src, dst):\n"
                "    real(src, dst)\n"
                "    if str(dst).endswith('head.safetensors'):\n"
                "        os.kill(os.getpid(), signal.SIGKILL)\n"
                "f.os.replace = replace\n"
                "import sys\nfrom tlflow.flows.cli import main\n"
                "sys.exit(main(['stage', 'train']))\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=s.project, env=s.env,
                              capture_output=True, text=True)
        case.kills += 1
        if proc.returncode != -signal.SIGKILL:
            case.problems.append(f"train was not killed between the files ({proc.returncode})")
        s.refused(case, lambda: s.stage_refusal("evaluate"))
        s.in_process("train")


def run_bad_paths(s: Suite) -> None:
    with s.case("paths: root, ancestor, another path") as case:
        for key, value in (("features", "."), ("images", ".."), ("features", "data/images"),
                           ("report", "/tmp/elsewhere.html")):
            def edit(raw: dict, key: str = key, value: str = value) -> None:
                if key in raw["base"]["paths"]:
                    raw["base"]["paths"][key] = value
            text = _set_params(s.project, edit)
            try:
                def run() -> str:
                    proc = s.cli("run")
                    if proc.returncode != 2:
                        return f"exit {proc.returncode}\n{proc.stderr}"
                    return proc.stderr
                s.refused(case, run)
            finally:
                (s.project / "params.yaml").write_text(text)


def run_flow_kills(s: Suite, a: dict, b: dict, b_codes: dict, kills: int) -> None:
    with s.case("tlflow run: refused input") as case:
        text = _set_params(s.project, lambda raw: raw["train"].update(C_grid=[-1.0]))
        try:
            s.refused(case, lambda: s.cli("run").stderr)
        finally:
            (s.project / "params.yaml").write_text(text)
    with s.case("tlflow run: SIGKILL") as case:
        for _ in range(kills):
            born = s.kill_at(["run"], s.rng.uniform(1.0, 40.0))
            case.kills += 1
            time.sleep(0.5)  # the kernel delivers the parent-death signal
            left = _alive(born)
            if left:
                case.problems.append(f"{len(left)} process(es) left: "
                                     f"{[' '.join(psutil.Process(p).cmdline()[:3]) for p in left]}")
                for pid in left:
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(pid).kill()
            s.check_old_or_new(case, a, b, b_codes)


def run_recovery(s: Suite, b: dict) -> None:
    with s.case("next run: dvc status clean, B's metrics") as case:
        proc = s.cli("run")
        if proc.returncode != 0:
            case.problems.append(f"tlflow run: exit {proc.returncode}: {proc.stderr[-500:]}")
        status = subprocess.run(["dvc", "status"], cwd=s.project, env=s.env, text=True,
                                capture_output=True)
        if "up to date" not in status.stdout:
            case.problems.append(f"dvc status: {status.stdout.strip()[:300]}")
        now = s.outputs()
        for rel in (r for r in b if r.startswith("metrics/")):
            if now.get(rel) != b[rel]:
                case.problems.append(f"{rel} differs from an uninterrupted run's")


def run_full_disk(s: Suite, snapshot_a: Path) -> None:
    disk = s.base / "project-disk"
    shutil.copytree(snapshot_a, disk, symlinks=True)
    features = disk / "features"
    shutil.rmtree(features)
    features.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(features)],
                      capture_output=True).returncode != 0:
        print("  full disk: skipped (cannot mount a tmpfs here)", file=sys.stderr)
        return
    try:
        with s.case("full disk during extract (1 MiB tmpfs)") as case:
            proc = subprocess.run(["tlflow", "stage", "extract"], cwd=disk, env=s.env,
                                  text=True, capture_output=True)
            errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            if proc.returncode != 2 or len(errors) != 1 or "disk full" not in errors[0]:
                case.problems.append(f"exit {proc.returncode}, stderr: {proc.stderr[-400:]}")
    finally:
        subprocess.run(["umount", "-l", str(features)], check=False)


INTERRUPT_BUDGET_S = 10.0  # from the signal to the exit, on this machine (issue 23)


def interrupt_at(s: Suite, moment: float, sig: int) -> tuple[int | None, float, str, set[int]]:
    """Start `tlflow run`, send `sig` to its process group `moment` seconds in (as a terminal's
    Ctrl-C or `docker stop` do); its status (None when it ended first), the seconds from the
    signal to its exit, its output and the processes it had started."""
    proc = subprocess.Popen(["tlflow", "run"], cwd=s.project, env=s.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    born = _watch(proc, moment)
    if proc.poll() is not None:
        return None, 0.0, proc.stdout.read(), born
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, time.monotonic() - t0, out, born


def run_flow_interrupts(s: Suite, a: dict, b: dict, b_codes: dict, n: int) -> None:
    """Seeded SIGINTs and SIGTERMs to `tlflow run`'s process group at random moments."""
    with s.case("tlflow run: SIGINT / SIGTERM") as case:
        for _ in range(n):
            sig = s.rng.choice((signal.SIGINT, signal.SIGTERM))
            rc, secs, out, born = interrupt_at(s, s.rng.uniform(1.0, 40.0), sig)
            case.kills += 1
            if rc is not None and rc != 128 + sig:
                case.problems.append(f"{sig.name}: exit {rc}, not {128 + sig}: {out[-300:]!r}")
            if secs > INTERRUPT_BUDGET_S:
                case.problems.append(f"{sig.name}: exited {secs:.1f} s after the signal")
            if "Traceback" in out:
                case.problems.append(f"{sig.name}: a traceback")
            if rc is not None and not any(line.startswith("interrupted: ")
                                          for line in out.splitlines()):
                case.problems.append(f"{sig.name}: no 'interrupted:' line")
            time.sleep(0.5)
            left = _alive(born)
            if left:
                case.problems.append(f"{len(left)} process(es) left after {sig.name}")
                for pid in left:
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(pid).kill()
            s.check_old_or_new(case, a, b, b_codes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    base = Path(tempfile.mkdtemp(prefix="tlflow-faults-"))
    t0 = time.perf_counter()
    try:
        s = Suite(base, args.seed)
        with s.case("setup: versions A and B") as case:
            a, b, b_codes, snapshot_a = build_versions(s)
        if case.problems:
            return _report(s, t0)
        run_stage_cases(s, a, b, b_codes, args.kills)
        run_pair_case(s, snapshot_a)
        run_bad_paths(s)
        run_full_disk(s, snapshot_a)
        run_flow_kills(s, a, b, b_codes, args.kills)
        run_flow_interrupts(s, a, b, b_codes, args.kills)
        run_recovery(s, b)
        return _report(s, t0)
    finally:
        if args.keep:
            print(f"scratch: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def _report(s: Suite, t0: float) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tlflow fault suite")
    for col in ("case", "kills", "result", "seconds"):
        table.add_column(col)
    for c in s.cases:
        table.add_row(c.name, str(c.kills), "ok" if not c.problems else "; ".join(c.problems),
                      f"{c.seconds:.1f}")
    failed = sum(bool(c.problems) for c in s.cases)
    table.add_row("total", str(sum(c.kills for c in s.cases)),
                  f"{len(s.cases) - failed} ok, {failed} failed",
                  f"{time.perf_counter() - t0:.1f}")
    Console(width=160).print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
