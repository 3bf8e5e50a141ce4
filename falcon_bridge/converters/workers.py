"""Parallel conversion: one import-hf, export-hf or reshard shared by several processes, each writing its own files.

Where the processes come from (one code path for both):
- `--workers N` on one host: once the converter has validated its input and planned the work, `Team.convert`
  forks N-1 children (before any thread of ours starts; fork hands them the plan instead of recomputing it). They
  join a gloo process group through a FileStore in a private temporary directory.
- torchrun (several hosts over a shared filesystem, or one): every process runs the same command and validates the
  same input; torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) defines the group.

Rank 0, the leader, owns the output: the partial directory with its owner record, the manifest, the swap into
place. It tells the others where the partial directory is; every rank writes its share of the tensors into it; each
rank's outcome (its peak RSS, or the one line that says why it failed) is gathered on every rank before the leader
finishes, so a failure anywhere fails the run everywhere and nothing is left at OUT. A torch_dist checkpoint is made
for many writers (DCP: one set of files per rank, the coordinator writes `.metadata`); an HF checkpoint's shard
headers are laid out from the plan, so every rank writes its tensors at their offsets. Only JSON crosses between
ranks (in uint8 tensors): nothing a peer sends is unpickled by us.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import json
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from falcon_bridge.errors import BadInput, first_line, printable, root_cause, shown

MIN_BYTES_PER_WORKER = 256 * 1024**2  # below this a worker's start (fork, group) costs more than its share saves
WORKER_BASE_BYTES = 1 << 30  # the per-worker memory bound's "+ 1 GiB": interpreter, torch, DCP
GROUP_TIMEOUT = timedelta(hours=2)  # a rank may wait this long for the slowest rank's share at the final gather

Step = Callable[[str], None]  # a rank's progress: called with each item it finished
# (rank, partial output directory, step) → this rank's result: a JSON object, whose "hashed" (relative path →
# {sha256, bytes}) names files the rank hashed as it wrote them, so the manifest does not hash them again
Share = Callable[[int, Path, Step], dict]


def balanced_shares(sizes: Sequence[int], n: int) -> list[list[int]]:
    """The indices of `sizes` split into n lists of nearly equal total (largest first, onto the least loaded rank;
    ties to the lower rank), each list in index order: every rank that computes it gets the same split."""
    loads = [(0, rank) for rank in range(n)]
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + sizes[i], rank))
    return [sorted(s) for s in shares]


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process as one of several."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return (rank, size) if size > 1 else None


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_workers(total_bytes: int, largest_bytes: int) -> int:
    """What the cores, the free memory (2 × the largest tensor + 1 GiB per worker) and the work allow."""
    cores = len(os.sched_getaffinity(0))
    by_memory = available_memory() // (2 * largest_bytes + WORKER_BASE_BYTES)
    return max(1, min(cores, by_memory, total_bytes // MIN_BYTES_PER_WORKER))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _failure_line(e: BaseException, rank: int) -> str:
    if isinstance(e, BadInput):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full while writing the output"
    return f"worker {rank}: {first_line(e)}"


class Team:
    """The processes of one conversion: `size` of them, this one being `rank`. `Team(workers, ...)` decides the
    size (torchrun's world, else --workers, else `default_workers`); `convert` starts them and runs the work."""

    def __init__(self, workers: int | None, total_bytes: int, largest_bytes: int):
        world = torchrun_world()
        if workers is not None and (type(workers) is not int or workers < 1):
            raise BadInput(f"--workers {shown(workers)}: expected a positive integer")
        if world:
            if workers not in (None, 1):
                raise BadInput(f"--workers {workers}: under torchrun every process is one worker (torchrun's "
                               "--nproc-per-node sets how many run on each host)")
            self.rank, self.size, self.forked = world[0], world[1], False
            self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the ranks on this host
        else:
            self.rank, self.size = 0, workers or default_workers(total_bytes, largest_bytes)
            self.forked = self.size > 1
            self.local_size = self.size
            if self.forked and dist.is_initialized():  # forked children cannot share the caller's group
                raise BadInput(f"--workers {self.size}: this process already belongs to a torch.distributed group; "
                               "convert with one worker here, or start the conversion under torchrun")
        self.peak_rss: list[int] = []  # per rank, once `convert` returned on the leader
        self._children: dict[int, int] = {}  # rank → pid of the forked children
        self._done = None  # per-rank finished-item counters in memory shared with the forked children

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def convert(self, run, name: str, options: Any, expected_bytes: int, hash_sources: Callable[[], Any],
                inputs: Sequence[Path], total_items: int, share: Share,
                finish: Callable[[Path, Any, list], Any]) -> Any:
        """`share(rank, tmp, step)` on every rank into the leader's partial output directory (`run.output`, which
        records `options`), then, on the leader, `finish(tmp, sources, results)` with every rank's share result in
        rank order (configs, tokenizer: the files only the leader writes) and its return value. Under torchrun the
        other ranks return None; forked children never return. `hash_sources()` starts hashing the source files
        (threads: called once the children exist)."""
        if self.size == 1:
            sources, hashed = hash_sources(), {}
            with run.output(name, options, expected_bytes, sources, inputs, hashed) as tmp:
                done = [0]

                def step(item: str) -> None:
                    done[0] += 1
                    run.step(done[0], total_items, item)

                result = share(0, tmp, step)
                hashed.update(result.get("hashed", {}))
                self.peak_rss = [peak_rss()]
                return finish(tmp, sources, [result])
        if self.forked:
            self._fork()
            if not self.leader:
                self._child(share)
        try:
            self._join_group()
            if not self.leader:
                return self._follow(share)
            return self._lead(run, name, options, expected_bytes, hash_sources, inputs, total_items, share, finish)
        finally:
            if self.leader:
                self._stop_children()
                if dist.is_initialized():
                    dist.destroy_process_group()

    # ---- starting the processes ----------------------------------------------------------------------------
    def _fork(self) -> None:
        self._store = tempfile.mkdtemp(prefix="falcon-bridge-workers-")
        self._done = multiprocessing.RawArray("q", self.size)
        for rank in range(1, self.size):
            try:
                pid = os.fork()
            except OSError as e:
                self._stop_children()
                raise BadInput(f"--workers {self.size}: cannot start worker {rank} ({e.strerror})") from None
            if pid == 0:
                self.rank, self._children = rank, {}
                # OpenMP is not fork-safe: a caller that ran torch ops before converting left the intra-op thread
                # pool in a state a child's first parallel region hangs on. Forked children compute on one thread.
                torch.set_num_threads(1)
                for signum in (signal.SIGINT, signal.SIGTERM):  # a child stops at once; the leader cleans up
                    signal.signal(signum, signal.SIG_DFL)
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the child dies with the leader
                if os.getppid() == 1:  # the leader died before prctl took effect
                    os._exit(1)
                return
            self._children[rank] = pid

    def _join_group(self) -> None:
        if self.forked:
            store = dist.FileStore(os.path.join(self._store, "rendezvous"), self.size)
            dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.size, timeout=GROUP_TIMEOUT)
        elif not dist.is_initialized():
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)

    def _stop_children(self) -> None:
        """Kill and reap the forked children still running: once this returns, nothing else writes the output."""
        for pid in self._children.values():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._children = {}
        if getattr(self, "_store", None):
            shutil.rmtree(self._store, ignore_errors=True)
            self._store = None

    # ---- the two roles -------------------------------------------------------------------------------------
    def _step(self, run, total_items: int) -> Step:
        own = [0]  # under torchrun each process counts only its own items

        def step(item: str) -> None:
            own[0] += 1
            if self._done is not None:
                self._done[self.rank] += 1
            if self.leader:
                run.step(own[0] if self._done is None else sum(self._done), total_items, item)
        return step

    def _lead(self, run, name, options, expected_bytes, hash_sources, inputs, total_items, share, finish) -> Any:
        announced = False
        try:
            sources, hashed = hash_sources(), {}
            with run.output(name, options, expected_bytes, sources, inputs, hashed) as tmp:
                self._broadcast(str(tmp))
                announced = True
                try:
                    outcome = self._outcome(share, tmp, run, total_items)
                    outcomes = self._all_gather(outcome)
                except RuntimeError as e:  # a collective failed: a peer died
                    raise BadInput(self._lost_worker_line(e)) from None
                finally:
                    self._stop_children()  # before run.output removes tmp on failure: nothing writes into it then
                _raise_first_failure(outcomes)
                for o in outcomes:
                    hashed.update(o["result"].get("hashed", {}))
                self.peak_rss = [o["peak_rss"] for o in outcomes]
                return finish(tmp, sources, [o["result"] for o in outcomes])
        finally:
            if not announced:  # the output could not be opened: the others stop (the leader says why)
                try:
                    self._broadcast("")
                except RuntimeError:
                    pass

    def _child(self, share: Share) -> None:
        """A forked child: its share, then `os._exit` whatever happened (its exit status and the gathered outcome
        are all the leader needs; it must never return into the caller's code)."""
        code = 1
        try:
            self._join_group()
            self._follow(share)
            code = 0
        finally:
            os._exit(code)

    def _follow(self, share: Share) -> None:
        """A rank other than the leader: its share once the leader has opened the output, then the outcomes; under
        torchrun it raises the run's failure like the leader."""
        try:
            tmp = self._broadcast(None)
            if not tmp:
                raise BadInput("the leader (rank 0) could not open the output; its message says why")
            _raise_first_failure(self._all_gather(self._outcome(share, Path(tmp), None, 0)))
        finally:
            if not self.forked:
                dist.destroy_process_group()

    def _outcome(self, share: Share, tmp: Path, run, total_items: int) -> dict:
        """This rank's share run, as the JSON every rank gathers. An interrupt is not caught: it stops this process
        at once (the leader then kills the children and removes the partial output)."""
        threads = torch.get_num_threads()
        # torch's intra-op pool defaults to every core in each process: N ranks of it would oversubscribe the cores
        # N-fold (its threads spin while they wait); the ranks on one host share the cores instead (a forked child
        # keeps its one thread)
        torch.set_num_threads(min(threads, max(1, len(os.sched_getaffinity(0)) // self.local_size))
                              if self.forked and not self.leader
                              else max(1, len(os.sched_getaffinity(0)) // self.local_size))
        try:
            result = share(self.rank, tmp, self._step(run, total_items))
            return {"rank": self.rank, "peak_rss": peak_rss(), "error": None, "result": result}
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every failure becomes the run's one line
            # DCP (a BaseException) reports what failed on each rank of its collective write, keyed by rank
            rank = next(iter(e.failures), self.rank) if isinstance(e, CheckpointException) else self.rank
            return {"rank": self.rank, "peak_rss": peak_rss(), "error": _failure_line(root_cause(e), rank)}
        finally:
            torch.set_num_threads(threads)

    def _lost_worker_line(self, e: RuntimeError) -> str:
        """Which child died and how: gloo saw its connection close, its exit status follows within moments."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for rank, pid in list(self._children.items()):
                waited, status = os.waitpid(pid, os.WNOHANG)
                if not waited:
                    continue
                del self._children[rank]
                if os.WIFSIGNALED(status):
                    return (f"worker {rank} (pid {pid}) was killed by {signal.Signals(os.WTERMSIG(status)).name}; "
                            "nothing was left at the output")
                if os.WEXITSTATUS(status):
                    return (f"worker {rank} (pid {pid}) exited with status {os.WEXITSTATUS(status)}; nothing was "
                            "left at the output")
            time.sleep(0.05)
        return f"a worker was lost ({printable(first_line(e))}); nothing was left at the output"

    # ---- JSON between ranks ----------------------------------------------------------------------------------
    def _broadcast(self, text: str | None) -> str:
        data = torch.tensor(list((text or "").encode()), dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(length, src=0)
        if not self.leader:
            data = torch.empty(int(length), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return data.numpy().tobytes().decode()

    def _all_gather(self, obj: dict) -> list[dict]:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64))
        width = int(max(lengths))
        gathered = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(gathered, torch.cat([data, torch.zeros(width - data.numel(), dtype=torch.uint8)]))
        return [json.loads(g[:int(n)].numpy().tobytes()) for g, n in zip(gathered, lengths)]


def _raise_first_failure(outcomes: list[dict]) -> None:
    for o in outcomes:
        if o["error"]:
            raise BadInput(o["error"])
