"""The emulated cluster: N nodes of G ranks on one machine, with a shaped inter-node link.

    switch namespace            node namespaces (one per node)
    ┌──────────────┐   veth    ┌───────────────────────────┐
    │ bridge  port0├───────────┤uplink 10.231.0.1  ranks 0..G-1
    │         port1├───────────┤uplink 10.231.0.2  ranks G..2G-1
    └──────────────┘           └───────────────────────────┘

Each node is a Linux network namespace whose only way out is its ``uplink``
veth (jumbo frames) into a bridge that lives in a namespace of its own. ``tc`` shapes both
directions of every uplink (a token bucket at the link rate, plus a delay
where the kernel has ``netem``), so traffic between nodes crosses a slow link
while ranks of one node talk over that namespace's loopback, as NVLink/HCCS
beside a slower NIC. Where the spec gives an intra-node rate (``moe-ascend launch
--scale-to``), a token bucket on each node's loopback holds the node's ranks to
it together: every byte between two ranks of a node crosses that loopback once.
Every address lives inside these namespaces; the host's network is untouched. The
namespaces are removed on every exit path: normal end, a failed rank, Ctrl-C or
SIGTERM, and, for a launcher that was killed outright, by the next launch
(namespaces named after a dead launcher's pid).

Each rank gets torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) plus ``GLOO_SOCKET_IFNAME`` and ``MOE_ASCEND_CLUSTER`` (the
cluster as JSON: nodes, ranks per node, the shaping actually applied).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from moe_ascend.kernels.errors import LaunchError

PREFIX = "moea"  # namespace names: moea<launcher pid>-sw, moea<launcher pid>-n<node>
SUBNET = "10.231.0"
MASTER_PORT = 29500
# Keep freed buffers in the heap, as a device's caching allocator does: glibc otherwise unmaps every
# buffer over 32 MiB at free and page-faults it back in at the next step (5x slower copies measured here).
HEAP_RETAINING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
UPLINK = "uplink"
# Jumbo frames, as data-centre fabrics run: at 1500 bytes the per-packet work of veth, bridge and tc on the shared
# cores held bench/a2a's bare 4 x 2 top-8 transfer to 0.79-0.83 of the shaped rate here; at 9000 it gave 0.82-0.89.
UPLINK_MTU = 9000
LOOPBACK_MTU = 65536  # Linux's default for lo


@dataclass
class ClusterSpec:
    nodes: int
    ranks_per_node: int
    inter_node_bandwidth: str = "1gbit"
    inter_node_latency: str = "100us"
    intra_node_bandwidth: str | None = None  # each node's loopback, all its ranks together; None: unshaped
    scaled_to: dict | None = None  # the target whose balance the rates give (compiler.planner.scaling.ScaledLinks)
    shaped: bool = False  # set once the links are really shaped
    latency_shaped: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise LaunchError(f"--nodes and --ranks-per-node must be at least 1, "
                              f"got {self.nodes} and {self.ranks_per_node}")
        if self.nodes > 200:
            raise LaunchError(f"--nodes {self.nodes}: the emulated cluster has room for 200 nodes")
        self.bandwidth_bits = parse_rate(self.inter_node_bandwidth)
        self.intra_bandwidth_bits = parse_rate(self.intra_node_bandwidth) if self.intra_node_bandwidth else None
        self.latency_s = parse_time(self.inter_node_latency)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"bandwidth_bits_per_s": self.bandwidth_bits, "latency_s": self.latency_s,
                                          "intra_bandwidth_bits_per_s": self.intra_bandwidth_bits})


def parse_rate(text: str) -> float:
    """``"1gbit"``, ``"200mbit"``, ``"500kbit"``, ``"10gbit"`` → bits per second (tc's spelling)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)bit\s*", text.lower())
    if not match:
        raise LaunchError(f"bandwidth {text!r} is not a rate such as '1gbit', '200mbit' or '500kbit'")
    return float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]]


def parse_time(text: str) -> float:
    """``"100us"``, ``"2ms"``, ``"0"`` → seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", text.lower())
    if not match:
        raise LaunchError(f"latency {text!r} is not a time such as '100us' or '2ms'")
    return float(match[1]) * {None: 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[match[2]]


def shaping_unavailable() -> str | None:
    """Why namespaces and tc cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    return None


class EmulatedCluster:
    """Creates the namespaces, bridge and shaped links on enter; removes them on exit, whatever happened."""

    def __init__(self, spec: ClusterSpec, tag: str | None = None):
        self.spec = spec
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.node_ns = [f"{self.tag}-n{n}" for n in range(spec.nodes)]
        self.netem_missing = False

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def __enter__(self) -> "EmulatedCluster":
        remove_stale_namespaces()
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{self.address(n)} node{n}\n::ffff:{self.address(n)} node{n}\n" for n in range(self.spec.nodes))
        for node, ns in enumerate(self.node_ns):
            port = f"port{node}"
            _ip("netns", "add", ns)
            # `ip netns exec` shows /etc/netns/NS/hosts as /etc/hosts: peers' addresses resolve (gloo asks).
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(hosts)
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.spec.intra_bandwidth_bits:  # ranks of the node reach each other through this loopback only
                _tc("-n", ns, "qdisc", "add", "dev", "lo", "root",
                    *_token_bucket(self.spec.intra_bandwidth_bits, LOOPBACK_MTU))
            _ip("-n", ns, "link", "add", UPLINK, "mtu", str(UPLINK_MTU), "type", "veth",
                "peer", "name", port, "mtu", str(UPLINK_MTU), "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", UPLINK)
            _ip("-n", ns, "link", "set", UPLINK, "up")
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            # Both directions of the uplink: what the node sends and what it receives.
            self._shape(ns, UPLINK)
            self._shape(self.switch, port)
        self.spec.shaped = True

    def _shape(self, ns: str, dev: str) -> None:
        """A token bucket at the link rate, under a netem delay where the kernel has netem."""
        bucket = _token_bucket(self.spec.bandwidth_bits, UPLINK_MTU)
        if self._delay(ns, dev):
            _tc("-n", ns, "qdisc", "add", "dev", dev, "parent", "1:", *bucket)
        else:
            _tc("-n", ns, "qdisc", "add", "dev", dev, "root", *bucket)

    def _delay(self, ns: str, dev: str) -> bool:
        """Adds the netem delay as the root qdisc; False (and one note) when the kernel lacks netem."""
        spec = self.spec
        if spec.latency_s == 0 or self.netem_missing:
            return False
        delay = f"{max(1, round(spec.latency_s * 1e6))}us"
        done = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                               "delay", delay], capture_output=True, text=True)
        if done.returncode != 0:
            self.netem_missing = True
            spec.notes.append(f"latency shaping is off: this kernel has no netem qdisc ({done.stderr.strip()}); "
                              "the inter-node bandwidth is shaped, its latency is not")
            return False
        spec.latency_shaped = True
        return True

    def remove(self) -> None:
        """Deleting a namespace deletes its veth ends and, with them, their peers and the bridge ports."""
        for ns in [*self.node_ns, self.switch]:
            _remove_namespace(ns)


def _token_bucket(bits_per_s: float, mtu: int) -> list[str]:
    """tc's token bucket at ``bits_per_s``: a burst of about 1 ms at that rate, and never under a few packets
    (tbf drops a packet larger than its burst)."""
    burst = max(64 * 1024, 4 * mtu, int(bits_per_s / 8 / 1000))
    return ["tbf", "rate", f"{int(bits_per_s)}bit", "burst", str(burst), "latency", "50ms"]


def remove_stale_namespaces() -> list[str]:
    """Namespaces left by a launcher that was killed outright (its pid is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for name in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, flags=re.M):
        ns, pid = name
        if not _pid_alive(int(pid)):
            _remove_namespace(ns)
            removed.append(ns)
    return removed


def _remove_namespace(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def launch(spec: ClusterSpec, command: list[str], out=None) -> int:
    """Run ``command`` once per rank on the emulated cluster; returns the job's exit code."""
    out = out or sys.stdout
    if not command:
        raise LaunchError("nothing to run: put the script after '--', e.g. moe-ascend launch --nodes 2 -- train.py")
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    reason = shaping_unavailable()
    if reason:
        print(f"moe-ascend launch: shaping is off ({reason}); running {spec.world_size} ranks on loopback",
              file=out, flush=True)
        return _supervise(spec, command, None, out)
    with EmulatedCluster(spec) as cluster:
        for note in spec.notes:
            print(f"moe-ascend launch: {note}", file=out, flush=True)
        return _supervise(spec, command, cluster, out)


def rank_environment(spec: ClusterSpec, rank: int, cluster: EmulatedCluster | None, master_port: int) -> dict[str, str]:
    node, local = divmod(rank, spec.ranks_per_node)
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(spec.world_size),
        LOCAL_WORLD_SIZE=str(spec.ranks_per_node), GROUP_RANK=str(node), NODE_RANK=str(node),
        GROUP_WORLD_SIZE=str(spec.nodes), ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(spec.world_size),
        MASTER_ADDR=cluster.address(0) if cluster else "127.0.0.1", MASTER_PORT=str(master_port),
        GLOO_SOCKET_IFNAME=UPLINK if cluster else "lo", MOE_ASCEND_CLUSTER=spec.to_json(),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
    )
    for name, value in HEAP_RETAINING_ENV.items():
        env.setdefault(name, value)
    return env


def _supervise(spec: ClusterSpec, command: list[str], cluster: EmulatedCluster | None, out) -> int:
    """Start every rank, relay its output with a ``[rN]`` prefix, and end the job at the first failure.

    A waiter thread per rank records exits in the order they happen, so the rank
    that failed first is the one reported, not a peer that lost its connection to it.
    """
    procs: list[subprocess.Popen] = []
    exits: queue.Queue = queue.Queue()
    tails = {rank: deque(maxlen=30) for rank in range(spec.world_size)}
    printing = threading.Lock()
    interrupted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: interrupted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}

    def relay(rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            text = line.decode(errors="replace").rstrip("\n")
            tails[rank].append(text)
            with printing:
                print(f"[r{rank}] {text}", file=out, flush=True)

    def wait(rank: int, proc: subprocess.Popen, relay_thread: threading.Thread) -> None:
        code = proc.wait()
        relay_thread.join()
        exits.put((rank, code))

    master_port = MASTER_PORT if cluster else free_port()  # loopback shares the host's ports: one free one, for all
    try:
        for rank in range(spec.world_size):
            netns = ["ip", "netns", "exec", cluster.node_ns[rank // spec.ranks_per_node]] if cluster else []
            proc = subprocess.Popen([*netns, *command], env=rank_environment(spec, rank, cluster, master_port),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            relay_thread = threading.Thread(target=relay, args=(rank, proc), daemon=True)
            relay_thread.start()
            threading.Thread(target=wait, args=(rank, proc, relay_thread), daemon=True).start()
        failed, finished = None, 0
        while finished < len(procs) and not interrupted:
            try:
                rank, code = exits.get(timeout=0.2)
            except queue.Empty:
                continue
            finished += 1
            if code != 0 and failed is None:
                failed = (rank, code)
                _stop(procs)
        if interrupted:
            _stop(procs)
            print(f"moe-ascend launch: interrupted ({signal.Signals(interrupted[0]).name}); stopped all ranks",
                  file=out, flush=True)
            return 128 + interrupted[0]
        if failed is None:
            return 0
        rank, code = failed
        node, local = divmod(rank, spec.ranks_per_node)
        with printing:
            print(f"moe-ascend launch: rank {rank} (node {node}, local rank {local}) failed with exit code {code}; "
                  "the other ranks were stopped. Its last lines:", file=out, flush=True)
            for text in tails[rank]:
                print(f"  {text}", file=out, flush=True)
        return code if code > 0 else 1
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every live rank (its whole session), then SIGKILL what is still there after ``grace_s``."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_session(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_session(p, signal.SIGKILL)
            p.wait()


def _signal_session(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ip(*args: str) -> None:
    _run_tool("ip", *args)


def _tc(*args: str) -> None:
    _run_tool("tc", *args)


def _run_tool(tool: str, *args: str) -> None:
    done = subprocess.run([tool, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"'{tool} {' '.join(args)}' failed: {done.stderr.strip()}")


def cluster_from_environment() -> dict | None:
    """The launcher's description of the cluster this rank runs in (None outside ``moe-ascend launch``)."""
    text = os.environ.get("MOE_ASCEND_CLUSTER")
    return json.loads(text) if text else None


def end_process_group(timeout_s: float = 10.0, settled_s: float = 0.5) -> None:
    """Destroy the default process group, then wait, with the GIL free, until gloo's worker threads are gone or
    none has ended for ``settled_s``.

    A gloo worker thread drops a finished collective's tensors after ``wait()`` has returned, and dropping
    them takes the GIL. Were the interpreter already finalizing, that thread would be killed holding a
    C++ frame and the whole rank abort ("terminate called without an active exception", once in about
    eight two-rank runs measured here), after every result was written. So a rank ends here, not at exit.
    A group that a functional collective has run on outlives ``destroy_process_group`` (torch 2.13 keeps a
    reference in C++): its threads idle until exit, never end, and waiting longer for them only costs time.
    """
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    deadline = time.monotonic() + timeout_s
    left, changed = _gloo_threads(), time.monotonic()
    while left and time.monotonic() < min(deadline, changed + settled_s):
        gc.collect()  # a group kept alive by a reference cycle goes now, its threads with it
        time.sleep(0.01)
        if (now := _gloo_threads()) != left:
            left, changed = now, time.monotonic()


def _gloo_threads() -> list[str]:
    """This process's gloo worker and transport threads, by name (Linux names them in /proc)."""
    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name.startswith(("pt_gloo", "gloo_")):
            names.append(name)
    return names
