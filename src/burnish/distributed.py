"""Data-parallel training over `mx.distributed` (ring, MPI, NCCL, JACCL).

A run is distributed when a launcher (`mlx.launch`, `mpirun`) started this
process as one of several ranks; `world()` then holds the group. The Trainer
uses the helpers here at a few points:

* data: every rank plans the same *global* batches of
  `per_device_train_batch_size * size` examples from the shared seed and
  takes its own contiguous slice (`iterate_shards`). The trained-token count
  of the whole global batch is known on the host from the plan, so each rank
  scales its summed loss by 1 / (global tokens) and the gradients are summed
  across ranks: N ranks with batch b compute exactly what one rank with batch
  N*b computes.
* one small collective per step (`sync_step`): the step's loss summed over
  ranks (logs and checkpoints hold global numbers on every rank) and an
  agreement to stop (a signal seen by one rank stops all at the same step).
* rank 0 alone writes metrics, plots, checkpoints and exports; a barrier
  follows every checkpoint; a resumed run checks that all ranks resume from
  the same checkpoint step (`agree_resume`).
* `Monitor`: a heartbeat file per rank in `output_dir/.burnish-ranks/` and a
  watchdog thread that stops this rank with an error naming the failed rank
  when another rank dies (exit record, vanished process on this host) or
  stops beating (hung) for `BURNISH_HEARTBEAT_TIMEOUT` seconds (default 120).

`launch_local` is `burnish train CONFIG --nproc N`: N processes on this
machine through `mlx.launch` (ring backend on 127.0.0.1, no ssh), supervised
so that the command exits non-zero naming the failed rank when one dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .errors import BurnishError

# Set by the launchers of MLX's backends (ring / mpi / nccl / jaccl). Without
# them the process is a single rank and no group is created.
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
              "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")
RANKS_DIR = ".burnish-ranks"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RankFailed(BurnishError):
    """Another rank of a distributed run failed (or this rank did, for the launcher)."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    group: object | None = None  # mx.distributed.Group when size > 1
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when a distributed launcher set this process up as a rank."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


def world() -> World:
    """The distributed group this process belongs to (size 1 when not launched).

    `mx.distributed.init` returns the same global group on later calls.
    """
    if not launched() or not mx.distributed.is_available():
        return World()
    group = mx.distributed.init(strict=False)
    if group.size() <= 1:
        return World()
    return World(group, group.rank(), group.size())


# --- collectives (host-side values) --------------------------------------------


def _all(world: World, values, op="sum", dtype=mx.float32) -> list:
    x = values if isinstance(values, mx.array) else mx.array(values, dtype)
    fn = {"sum": mx.distributed.all_sum, "gather": mx.distributed.all_gather}[op]
    out = fn(x, group=world.group, stream=mx.cpu)
    return out.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        _all(world, [1.0])


def sum_scalar(world: World, value) -> mx.array:
    """An mx scalar summed over ranks (float32)."""
    if world.size == 1:
        return value
    return mx.distributed.all_sum(value.astype(mx.float32).reshape(1), group=world.group,
                                  stream=mx.cpu)[0]


def reduce_gradients(world: World, grads):
    """Gradients averaged over ranks (`nn.average_gradients`: few large
    all_sum calls). Each rank's loss is scaled by size / global tokens, so the
    average is the gradient of the token-weighted loss of the global window.
    """
    if world.size == 1:
        return grads
    from mlx.nn import average_gradients

    return average_gradients(grads, group=world.group)


def sync_step(world: World, window_start, log_sum, stop):
    """After an optimizer step: (log_sum with the window's loss summed over
    ranks, the stop request all ranks agree on).

    `stop` is None, "request" (Trainer.request_stop) or a signal number; any
    signal beats a request, SIGTERM beats SIGINT.
    """
    if world.size == 1:
        return log_sum, stop
    flags = [float(stop == "request")] + [float(stop == s) for s in HANDLED_SIGNALS]
    local = (log_sum - window_start).astype(mx.float32).reshape(1)
    out = mx.distributed.all_sum(mx.concatenate([local, mx.array(flags, mx.float32)]),
                                 group=world.group, stream=mx.cpu)
    mx.eval(out)
    agreed = None
    if out[1].item() > 0:
        agreed = "request"
    for s, v in zip(HANDLED_SIGNALS, out[2:].tolist()):
        if v > 0:
            agreed = s
    return window_start + out[0], agreed


def agree_resume(world: World, path):
    """Check that every rank resumes from the same checkpoint step.

    With resume_from_checkpoint=True each rank looks in output_dir; the
    checkpoint was completed (renamed into place) before the run started.
    """
    if world.size == 1:
        return path
    step = -1
    if path is not None:
        from .checkpoint import STATE_FILE

        try:
            step = int(json.loads((Path(path) / STATE_FILE).read_text())["state"]["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = -2  # unreadable here
    steps = [int(s) for s in _all(world, [step], "gather", mx.int32)]
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: " + ("none" if s == -1 else "unreadable" if s == -2
                                           else f"step {s}") for r, s in enumerate(steps))
        raise BurnishError(f"resume_from_checkpoint: the ranks see different checkpoints "
                           f"({seen}); output_dir must be one folder shared by all ranks")
    return path


def sync_trainable(world: World, model) -> bool:
    """Give every rank rank 0's trainable parameters if they differ (e.g. LoRA
    weights initialised without a shared seed). Compares a cheap digest
    first; returns True when weights were copied."""
    from mlx.utils import tree_flatten, tree_unflatten

    if world.size == 1:
        return False
    flat = tree_flatten(model.trainable_parameters())
    digest = mx.array([0.0, 0.0, float(len(flat))])
    for i, (_, v) in enumerate(flat):
        v = v.astype(mx.float32)
        digest = digest + mx.stack([v.sum() * (i + 1), v.abs().sum(), mx.array(0.0)])
    lo = mx.distributed.all_min(digest, group=world.group, stream=mx.cpu)
    hi = mx.distributed.all_max(digest, group=world.group, stream=mx.cpu)
    if mx.array_equal(lo, hi).item():
        return False
    if lo[2].item() != hi[2].item():
        raise BurnishError("Trainer: the ranks have different trainable parameters "
                           f"({int(lo[2].item())} to {int(hi[2].item())} arrays); every rank "
                           "must build the same model and adapters")
    keep = 1 if world.is_main else 0  # x + 0 + ... is exactly rank 0's x
    synced = [(k, mx.distributed.all_sum(v * keep, group=world.group)) for k, v in flat]
    model.update(tree_unflatten(synced))
    mx.eval(model.parameters())
    if world.is_main:
        import warnings

        warnings.warn("Trainer: the ranks started from different trainable weights; "
                      "all now use rank 0's (seed LoRA init, e.g. get_peft_model("
                      "random_state=...), to avoid this copy)", stacklevel=3)
    return True


# --- data ----------------------------------------------------------------------


def shard(entry: list, rank: int, size: int) -> list:
    """Rank's contiguous slice of one global batch; slices differ by at most one."""
    n = len(entry)
    return list(entry[rank * n // size:(rank + 1) * n // size])


def iterate_shards(examples, batch_size, world: World, *, seed=0, epoch=0, start=0,
                   packing=False, max_seq_length=2048, pad_to_multiple=32, shuffle=True,
                   pad_id=0, gather_multiple=0) -> Iterator:
    """This rank's part of each global batch of `batch_size * world.size`.

    The plan is `data.batch_plan` with the global batch size, identical on
    every rank (and identical to one rank running with that batch size).
    `Batch.n_tokens` is the trained-token count of the whole *global* batch,
    which is what the loss is normalised by. A rank whose slice of a short
    last batch is empty gets a stand-in row with zero weights: same work
    shape, zero loss and zero gradient.
    """
    from .data import batch_plan, make_batch
    from .vision_train import is_vlm_examples

    if is_vlm_examples(examples):
        raise BurnishError(f"Trainer: data-parallel training ({world.size} ranks) of "
                           "vision-language models is not supported yet; run one process")
    plan = batch_plan(examples, batch_size * world.size, seed=seed, packing=packing,
                      max_seq_length=max_seq_length, shuffle=shuffle, epoch=epoch)
    # make_batch trains target i of a document from weights[i], i >= 1
    trained = [int(sum(e.weights[1:])) for e in examples]
    for entry in plan[start:]:
        mine = shard(entry, world.rank, world.size)
        batch = make_batch(examples, mine or entry[:1], pad_to_multiple=pad_to_multiple,
                           packing=packing, pad_id=pad_id, gather_multiple=gather_multiple)
        if not mine:
            batch.weights = mx.zeros_like(batch.weights)
        batch.n_tokens = sum(trained[i] for unit in entry
                             for i in (unit if packing else [unit]))
        yield batch


# --- rank records, heartbeat and watchdog --------------------------------------


def ranks_dir(output_dir) -> Path:
    return Path(output_dir) / RANKS_DIR


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def record_start(folder: Path, rank: int, token=None, beat: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / f"rank-{rank}.json", {
        "rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
        "token": token, "beat": beat})


def record_exit(folder: Path, rank: int, code: int, error: str | None = None,
                cause: int | None = None, token=None, reason: str | None = None) -> None:
    """A rank's exit status; a failure, once written, is not overwritten."""
    path = folder / f"rank-{rank}.exit.json"
    old = _read_json(path)
    if old and old.get("code") and (token is None or old.get("token") in (token, None)):
        return  # keep the first (most specific) failure of this run
    folder.mkdir(parents=True, exist_ok=True)
    # cause: the rank whose failure stopped this one, and what happened to it
    _write_json(path, {"rank": rank, "code": int(code), "error": error, "cause": cause,
                       "reason": reason, "token": token})


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BurnishError) else f"{type(exc).__name__}: {exc}"


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return int(getattr(exc, "exit_code", 1) or 1)


def _comm_error(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (MLX's backends
    say so in the message: "[ring] connection to a peer was lost")."""
    msg = str(exc)
    return isinstance(exc, RuntimeError) and bool(re.match(r"\[(ring|mpi|nccl|jaccl)\]", msg))


class Monitor:
    """Heartbeat of this rank and watchdog over the others, for one train().

    Records live in `output_dir/.burnish-ranks/`: `rank-<r>.json` (pid,
    host, heartbeat counter, the run's token) and `rank-<r>.exit.json`. The
    token, broadcast by rank 0 at start, tells this run's records from stale
    ones. A rank that is not seen (no shared folder) is never judged; the
    collectives then still fail when its connection drops.
    """

    def __init__(self, world: World, output_dir, interval: float = 1.0,
                 timeout: float | None = None, grace: float = 5.0):
        self.world = world
        self.folder = ranks_dir(output_dir)
        self.interval = interval
        self.timeout = float(timeout if timeout is not None
                             else os.environ.get("BURNISH_HEARTBEAT_TIMEOUT", 120))
        self.grace = grace  # lets the main thread's own error surface first
        self.host = socket.gethostname()
        self.token = None
        self.failed_already = False
        self._halt = threading.Event()
        self._thread = None
        self._beats = {}  # peer -> (last beat, monotonic time it changed)

    def start(self) -> "Monitor":
        w = self.world
        if w.size == 1:
            return self
        token = int.from_bytes(os.urandom(3), "little") + 1 if w.is_main else 0
        self.token = int(_all(w, [token], "sum", mx.int32)[0])
        record_start(self.folder, w.rank, self.token)
        # the collective above: every rank is alive and has its record from here on
        barrier(w)
        self._beat = 0
        self._thread = threading.Thread(target=self._watch, name="burnish-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._halt.set()
        self._thread.join()
        self._thread = None
        if not self.failed_already:
            record_exit(self.folder, self.world.rank, 0, token=self.token)

    def failed(self, exc: BaseException) -> None:
        """Called with the exception ending train(): raises RankFailed naming
        the rank whose failure caused it, or records this rank's own failure."""
        if self._thread is None or self.failed_already:
            return
        self.failed_already = True
        cause = None
        if _comm_error(exc):  # a collective failed: find the rank that went away
            cause = self.check()
            deadline = time.monotonic() + self.grace
            while cause is None and time.monotonic() < deadline:
                time.sleep(0.2)
                cause = self.check()
        me = self.world.rank
        if cause is None:
            record_exit(self.folder, me, _exit_code(exc), _describe(exc), token=self.token)
            return
        peer, reason = cause
        msg = f"rank {me} stopped: rank {peer} {reason}"
        record_exit(self.folder, me, 1, msg, cause=peer, token=self.token, reason=reason)
        raise RankFailed(msg) from exc

    def check(self):
        """(rank, reason) of a peer that failed, or None."""
        now = time.monotonic()
        for peer in range(self.world.size):
            if peer == self.world.rank:
                continue
            exit_rec = _read_json(self.folder / f"rank-{peer}.exit.json")
            if exit_rec and exit_rec.get("token") == self.token:
                if exit_rec.get("code"):
                    return peer, f"failed: {exit_rec.get('error') or 'exit code ' + str(exit_rec['code'])}"
                continue  # finished normally
            rec = _read_json(self.folder / f"rank-{peer}.json")
            if not rec or rec.get("token") != self.token:
                continue
            if rec.get("host") == self.host and not _alive(int(rec["pid"])):
                return peer, f"died (pid {rec['pid']} on {self.host} exited without a status)"
            last = self._beats.get(peer)
            if last is None or last[0] != rec.get("beat"):
                self._beats[peer] = (rec.get("beat"), now)
            elif now - last[1] > self.timeout:
                return peer, f"stopped responding (no heartbeat for {self.timeout:.0f} s)"
        return None

    def _watch(self):
        first = None
        while not self._halt.wait(self.interval):
            self._beat += 1
            try:
                record_start(self.folder, self.world.rank, self.token, self._beat)
            except OSError:
                pass
            cause = self.check()
            if cause is None:
                first = None
                continue
            first = first if first is not None else time.monotonic()
            if (time.monotonic() - first < self.grace or self._halt.is_set()
                    or self.failed_already):  # the main thread is already handling it
                continue
            # the main thread is stuck in a collective: end the process from here
            peer, reason = cause
            msg = f"rank {self.world.rank} stopped: rank {peer} {reason}"
            self.failed_already = True
            record_exit(self.folder, self.world.rank, 1, msg, cause=peer, token=self.token,
                        reason=reason)
            print(f"burnish: error: {msg}", file=sys.stderr, flush=True)
            os._exit(1)


@contextmanager
def rank_process(output_dir):
    """`burnish train` inside a distributed run: record this process's start
    (pid, host) and exit status for the `--nproc` supervisor."""
    w = world()
    if w.size == 1:
        yield w
        return
    folder = ranks_dir(output_dir)
    record_start(folder, w.rank)
    (folder / f"rank-{w.rank}.exit.json").unlink(missing_ok=True)
    try:
        yield w
    except BaseException as exc:
        record_exit(folder, w.rank, _exit_code(exc), _describe(exc))
        raise
    else:
        record_exit(folder, w.rank, 0)


# --- `burnish train --nproc N` ---------------------------------------------------


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    import shutil

    found = shutil.which("mlx.launch")
    if found:
        return [found]
    raise BurnishError("--nproc: mlx.launch not found (it comes with the mlx package)")


def _free_ports(n: int) -> int:
    """A base port with n free consecutive ports on 127.0.0.1 (the ring
    backend listens on base + rank)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        try:
            for p in range(base, base + n):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise BurnishError("--nproc: no free ports on 127.0.0.1")


_LAUNCH_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def _code_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def local_rank_env(nproc: int, env=None) -> dict:
    """Environment for `nproc` ranks sharing this machine's cores: BLAS
    threads split between them unless the user chose (OpenBLAS threads spin
    while they wait; 2 ranks x 2 threads on 2 cores ran 2-3x slower)."""
    env = dict(os.environ if env is None else env)
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env.setdefault(key, threads)
    return env


def launch_local(config_path, overrides: list[str], nproc: int, output_dir,
                 grace: float = 20.0) -> int:
    """Run `burnish train` as `nproc` ranks on this machine through mlx.launch.

    Returns 0 when every rank finished; raises RankFailed naming the rank
    that failed first. If the others do not stop on their own within `grace`
    seconds of the failure, they are terminated (then killed).
    """
    import subprocess

    if nproc < 1:
        raise BurnishError(f"--nproc {nproc}: expected an integer >= 1")
    folder = ranks_dir(output_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [*_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(nproc),
           "--starting-port", str(_free_ports(nproc)), "--",
           sys.executable, "-m", "burnish.cli", "train", str(config_path), *overrides]
    # stdin: a pipe nobody writes (mlx.launch polls it and makes it non-blocking)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=local_rank_env(nproc))
    launcher_codes = {}

    def forward():
        for line in iter(proc.stderr.readline, b""):
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            m = _LAUNCH_EXIT.search(line.decode(errors="replace"))
            if m:
                launcher_codes[int(m.group(1))] = int(m.group(2)) if m.group(2) else -15

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    failures = {}  # rank -> (first seen, reason)
    interrupted = None

    def pids():
        recs = [_read_json(folder / f"rank-{r}.json") for r in range(nproc)]
        return [int(r["pid"]) for r in recs if r and r.get("host") == socket.gethostname()]

    def forward_signal(signum, frame):
        nonlocal interrupted
        interrupted = signum
        for pid in pids():
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    previous = {s: signal.signal(s, forward_signal) for s in HANDLED_SIGNALS}
    stopped_at = None
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic()
            for r in range(nproc):
                if r in failures:
                    continue
                exit_rec = _read_json(folder / f"rank-{r}.exit.json")
                rec = _read_json(folder / f"rank-{r}.json")
                if exit_rec and exit_rec.get("code") and exit_rec.get("cause") is None:
                    failures[r] = (now, f"failed: {exit_rec.get('error')}")
                elif exit_rec and exit_rec.get("cause") is not None:  # r saw another rank fail
                    failures.setdefault(exit_rec["cause"], (now, exit_rec.get("reason") or "failed"))
                elif not exit_rec and rec and not _alive(int(rec["pid"])):
                    failures[r] = (now, "died")
            if failures and stopped_at is None:
                stopped_at = now
            if stopped_at is not None and now - stopped_at > grace:
                _stop_group(proc)
                break
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        if proc.poll() is None:
            _stop_group(proc)
        proc.stdin.close()
        reader.join(timeout=5)
    # ranks whose process vanished: what mlx.launch saw them exit with
    for r, (t, reason) in failures.items():
        code = launcher_codes.get(r)
        if reason.startswith("died") and code is not None:
            failures[r] = (t, f"died ({_code_text(code)})")
        elif reason == "died":
            failures[r] = (t, "died (no exit status)")
    exits = [_read_json(folder / f"rank-{r}.exit.json") for r in range(nproc)]
    if all(e and e.get("code") == 0 for e in exits) and not any(launcher_codes.values()):
        shutil.rmtree(folder, ignore_errors=True)  # kept after a failure, for a look
        return 0
    if interrupted is not None:  # the ranks saved a checkpoint and stopped
        e = exits[0] or {}
        print(f"burnish: {e.get('error') or 'interrupted'}", file=sys.stderr)
        return e.get("code") or 128 + interrupted
    if not failures:  # e.g. a rank that exited before writing any record
        for r in range(nproc):
            e, code = exits[r] or {}, launcher_codes.get(r)
            if e.get("code") or code or not e:
                failures[r] = (0, f"failed: {e['error']}" if e.get("error") else
                               f"exited ({_code_text(code)})" if code else
                               "exited without a status")
                break
    first = min(failures, key=lambda r: failures[r][0])
    others = sorted(set(range(nproc)) - {first})
    raise RankFailed(f"rank {first} {failures[first][1]}; "
                     f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped")


def _stop_group(proc, wait: float = 5.0) -> None:
    """Terminate the launcher and every rank (they share its session); then
    kill what is left, stopped (SIGSTOP) processes included."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
