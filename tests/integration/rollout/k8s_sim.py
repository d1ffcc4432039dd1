"""A Kubernetes on one machine, for the rollout tests (README.md here).

What is real: the manifests (k8s/ rendered by `kubectl kustomize`), the
image contents (sidecar/Dockerfile's COPY lines and ENTRYPOINT: the baton
binary under test and the hot-restarter), baton's configuration from the
rendered ConfigMap, the Secret's files, the processes, TCP over a network.

What stands in:
- a pod is a network namespace (`ip netns`) with a veth on a bridge and an
  address of its own; each container is a process in it with its own mount
  and UTS namespaces (`unshare`): the pod name as host name, the volumes
  bind-mounted at their mountPath, the image's files at /usr/local/bin, the
  root filesystem read-only when the container asks for it, and the user,
  groups and capabilities of its securityContext (`setpriv`);
- the example app's image (hashicorp/http-echo) is http_echo_standin.py;
- the kubelet is SimPod: native sidecars (init containers with
  restartPolicy Always) start first, readiness probes run as the manifest
  says (httpGet, initialDelaySeconds, periodSeconds, timeoutSeconds,
  failureThreshold, successThreshold), and termination follows the
  documented order: every regular container's preStop hook, then its TERM;
  once all regular containers have exited, the sidecars' preStop and TERM
  in reverse order; KILL for whatever is left at
  terminationGracePeriodSeconds;
- the endpoints controller and kube-proxy are Service: a pod becomes an
  endpoint when it is Ready and stops being one when it is not Ready or
  is terminating, each change applied to an HAProxy (TCP, on the Service's
  own address) after a propagation delay; existing connections stay, as
  with kube-proxy's conntrack;
- the Deployment controller is Deployment: a rolling update within
  maxSurge/maxUnavailable, where terminating pods do not count.

Not simulated: liveness probes, startup probes, resource limits, image pulls.
Every name this creates starts with "btr<pid>" (namespaces, links), and
sweep_stale() removes those of runs whose process is gone.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import scaled, wait_until  # noqa: E402
from k8s_model import ROOT, resolve_port  # noqa: E402
from lbtools import HAProxy  # noqa: E402

HERE = Path(__file__).resolve().parent
TAG = "btr%d" % os.getpid()
# A Debian image's PATH (the runtime stage is debian:12-slim).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_BIN = "/usr/local/bin"


def sh(*argv, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError("%s: exit %d: %s%s" % (" ".join(map(str, argv)), r.returncode, r.stdout, r.stderr))
    return r


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def netns_pids(ns: str) -> List[int]:
    r = sh("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def delete_netns(ns: str, veth: Optional[str] = None) -> None:
    """Kills what runs in the namespace, waits until it is empty (a namespace
    and its veth live on while a process is in it), deletes it."""
    deadline = time.monotonic() + 10
    while True:
        pids = netns_pids(ns)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # polling the kernel's list; there is no event for "namespace empty"
    sh("ip", "netns", "del", ns, check=False)
    if veth:
        sh("ip", "link", "del", veth, check=False)  # normally gone with the namespace already


def sweep_stale() -> List[str]:
    """Removes the namespaces and links of earlier runs whose process is gone
    (a run killed before its cleanup); returns what it removed."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        m = re.match(r"btr(\d+)-", ns)
        if m and not pid_alive(int(m.group(1))):
            delete_netns(ns)
            removed.append(ns)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: (btr(\d+)[bv]\d*)[@:]", line)
        if m and not pid_alive(int(m.group(2))):
            sh("ip", "link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


# ---------------------------------------------------------------------------
# the network: a bridge, a /24, the Service address
# ---------------------------------------------------------------------------

class Network:
    def __init__(self):
        self.bridge = TAG + "b"
        used = sh("ip", "-4", "-o", "addr", "show").stdout + sh("ip", "-4", "route", "show", "table", "all").stdout
        free = [n for n in range(1, 255) if "10.254.%d." % n not in used]
        assert free, "no free 10.254.N.0/24 for the simulated cluster"
        self.prefix = "10.254.%d" % random.choice(free)
        self.node_ip = self.prefix + ".1"      # the root namespace: kubelet, clients
        self.service_ip = self.prefix + ".2"   # the Service (HAProxy)
        self.namespaces: List[str] = []
        self.veths: Dict[str, str] = {}
        self.next_ip = itertools.count(10)
        self.up_done = False

    def up(self) -> None:
        # nf_call_iptables 0: bridged traffic between pods skips the host's
        # iptables (br_netfilter may be loaded with a FORWARD policy of DROP).
        sh("ip", "link", "add", "name", self.bridge, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables",
           "0", "nf_call_arptables", "0")
        self.up_done = True
        sh("ip", "addr", "add", self.node_ip + "/24", "dev", self.bridge)
        sh("ip", "addr", "add", self.service_ip + "/32", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_pod(self, pod_name: str):
        """A namespace with eth0 on the bridge; returns (namespace, address)."""
        k = next(self.next_ip)
        assert k < 250, "too many pods"
        ns = "%s-%s" % (TAG, pod_name)
        veth = "%sv%d" % (TAG, k)
        ip = "%s.%d" % (self.prefix, k)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.veths[ns] = veth
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", self.node_ip)
        return ns, ip

    def remove_pod(self, ns: str) -> None:
        delete_netns(ns, self.veths.get(ns))
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def down(self) -> List[str]:
        """Removes everything; returns what was still there afterwards (should be nothing)."""
        for ns in list(self.namespaces):
            self.remove_pod(ns)
        if self.up_done:
            sh("ip", "link", "del", self.bridge, check=False)
        left = [l for l in sh("ip", "netns", "list").stdout.splitlines() if l.startswith(TAG + "-")]
        left += [l for l in sh("ip", "-o", "link", "show").stdout.splitlines() if (": %s" % TAG) in l]
        return left


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

class Image:
    """An image's files (all under /usr/local/bin, bind-mounted there) and its
    ENTRYPOINT/CMD."""

    def __init__(self, workdir: Path, name: str, files: Dict[str, Path], entrypoint: List[str], cmd: List[str]):
        self.name = name
        self.dir = workdir / "images" / name.replace("/", "_").replace(":", "_")
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        for dest, src in files.items():
            assert posixpath_dir(dest) == IMAGE_BIN, "%s: %s is not in %s" % (name, dest, IMAGE_BIN)
            self.install(os.path.basename(dest), src)
        self.entrypoint = entrypoint
        self.cmd = cmd

    def install(self, name: str, src: Path) -> Path:
        """Puts src at NAME atomically (a new file, renamed over the old one),
        as a package upgrade replaces a binary; returns the path."""
        dst = self.dir / name
        tmp = self.dir / (".%s.new" % name)
        shutil.copyfile(src, tmp)
        tmp.chmod(0o755)
        os.rename(tmp, dst)
        return dst


def posixpath_dir(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


def baton_image(workdir: Path, baton_bin: str, name: str) -> Image:
    """The runtime stage of sidecar/Dockerfile: its COPY lines (the binary
    from the build stage is the one under test) and its ENTRYPOINT/CMD."""
    lines = (ROOT / "sidecar" / "Dockerfile").read_text().splitlines()
    start = max(i for i, l in enumerate(lines) if l.startswith("FROM "))
    files: Dict[str, Path] = {}
    entrypoint: List[str] = []
    cmd: List[str] = []
    for l in lines[start:]:
        w = l.split()
        if not w:
            continue
        if w[0] == "COPY":
            args = [a for a in w[1:] if not a.startswith("--chown") and not a.startswith("--chmod")]
            if args[0].startswith("--from="):
                assert args[1].endswith("/baton"), "unexpected COPY from the build stage: %s" % l
                files[args[2]] = Path(baton_bin)
            else:
                files[args[1]] = ROOT / args[0]
        elif w[0] == "ENTRYPOINT":
            entrypoint = json.loads(l.split(None, 1)[1])
        elif w[0] == "CMD":
            cmd = json.loads(l.split(None, 1)[1])
    assert entrypoint, "sidecar/Dockerfile has no ENTRYPOINT in its last stage"
    return Image(workdir, name, files, entrypoint, cmd)


def app_image(workdir: Path, name: str) -> Image:
    return Image(workdir, name, {IMAGE_BIN + "/http-echo": HERE / "http_echo_standin.py"},
                 [IMAGE_BIN + "/http-echo"], [])


# ---------------------------------------------------------------------------
# a scheduler for delayed actions (endpoint propagation)
# ---------------------------------------------------------------------------

class Scheduler:
    def __init__(self):
        self.q: list = []
        self.seq = itertools.count()
        self.cv = threading.Condition()
        self.stopped = False
        self.errors: List[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="sim-scheduler")
        self.thread.start()

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        with self.cv:
            heapq.heappush(self.q, (time.monotonic() + delay, next(self.seq), fn))
            self.cv.notify()

    def _run(self):
        while True:
            with self.cv:
                while not self.stopped and (not self.q or self.q[0][0] > time.monotonic()):
                    self.cv.wait(None if not self.q else max(0.0, self.q[0][0] - time.monotonic()))
                if self.stopped:
                    return
                _, _, fn = heapq.heappop(self.q)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (reported by the test)
                self.errors.append(repr(e))

    def stop(self):
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(10)


# ---------------------------------------------------------------------------
# the Service: endpoints controller + kube-proxy
# ---------------------------------------------------------------------------

class Service:
    SLOTS = 16

    def __init__(self, workdir: Path, sock_dir: Path, network: Network, svc: dict, target_port: int,
                 propagation_s: float, scheduler: Scheduler):
        self.port = int(svc["spec"]["ports"][0]["port"])
        self.target_port = target_port
        self.propagation_s = propagation_s
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.slots: Dict[str, int] = {}
        self.free = list(range(1, self.SLOTS + 1))
        self.endpoints: Dict[str, bool] = {}   # pod -> in the Service now (after propagation)
        self.log: List[tuple] = []              # (time, pod, "added" | "removed")
        servers = ["server ep%d 127.0.0.1:%d disabled" % (i, target_port) for i in range(1, self.SLOTS + 1)]
        self.lb = HAProxy(workdir, sock_dir, servers, bind_host=network.service_ip, bind_port=self.port)

    @property
    def addr(self):
        return self.lb.addr

    def start(self):
        self.lb.start()

    def stop(self):
        self.lb.stop()

    def update(self, pod: "SimPod", serving: bool) -> None:
        """The pod's endpoint condition changed (Ready, or terminating): applied after the propagation delay."""
        self.scheduler.after(self.propagation_s, lambda: self._apply(pod, serving))

    def _apply(self, pod: "SimPod", serving: bool) -> None:
        with self.lock:
            if serving == self.endpoints.get(pod.name, False):
                return
            if pod.name not in self.slots:
                self.slots[pod.name] = self.free.pop(0)
            name = "ep%d" % self.slots[pod.name]
            if serving:
                self.lb.set_server(name, "addr %s port %d" % (pod.ip, self.target_port), "state ready")
            else:
                self.lb.set_server(name, "state maint")
            self.endpoints[pod.name] = serving
            self.log.append((time.monotonic(), pod.name, "added" if serving else "removed"))

    def serving(self) -> List[str]:
        with self.lock:
            return [p for p, s in self.endpoints.items() if s]


# ---------------------------------------------------------------------------
# containers and pods: the kubelet
# ---------------------------------------------------------------------------

class Container:
    def __init__(self, pod: "SimPod", spec: dict, image: Image, sidecar: bool):
        self.pod = pod
        self.spec = spec
        self.name = spec["name"]
        self.image = image
        self.sidecar = sidecar
        self.dir = pod.dir / "containers" / self.name
        self.dir.mkdir(parents=True)
        self.stdout_path = self.dir / "stdout"
        self.stderr_path = self.dir / "stderr"
        self.proc: Optional[subprocess.Popen] = None
        self.ready = "readinessProbe" not in spec   # no probe: ready once running
        self.events: Dict[str, float] = {}
        self.prestop_result: Optional[tuple] = None
        self.exit_code: Optional[int] = None

    # -- what the kubelet computes from the spec --

    def env(self) -> dict:
        """The container's env: values, and the Downward API fields the
        kubelet fills in (status.podIP, metadata.name)."""
        out = {}
        for e in self.spec.get("env") or []:
            if "valueFrom" in e:
                path = ((e["valueFrom"] or {}).get("fieldRef") or {}).get("fieldPath")
                fields = {"status.podIP": self.pod.ip, "metadata.name": self.pod.name}
                assert path in fields, "the simulation has no env source %r" % e["valueFrom"]
                out[e["name"]] = fields[path]
            else:
                out[e["name"]] = str(e.get("value", ""))
        return out

    @staticmethod
    def expand(s: str, env: dict) -> str:
        """Kubernetes' $(VAR) expansion in command and args: a variable of the
        container's env is replaced, $$ is a literal $, anything else stays."""
        out, i = [], 0
        while i < len(s):
            if s.startswith("$$", i):
                out.append("$")
                i += 2
            elif s.startswith("$(", i) and s.find(")", i) > 0 and s[i + 2:s.find(")", i)] in env:
                j = s.find(")", i)
                out.append(env[s[i + 2:j]])
                i = j + 1
            else:
                out.append(s[i])
                i += 1
        return "".join(out)

    def argv(self) -> List[str]:
        """command overrides ENTRYPOINT, args overrides CMD (and a command
        without args drops CMD); $(VAR) in command and args is expanded."""
        command = self.spec.get("command") or self.image.entrypoint
        if "args" in self.spec:
            args = self.spec["args"]
        else:
            args = [] if self.spec.get("command") else self.image.cmd
        env = self.env()
        return [self.expand(str(a), env) for a in command + args]

    def security(self) -> dict:
        psc = self.pod.spec.get("securityContext") or {}
        sc = self.spec.get("securityContext") or {}
        return {
            "uid": sc.get("runAsUser", psc.get("runAsUser", 0)),
            "gid": sc.get("runAsGroup", psc.get("runAsGroup", 0)),
            "fs_group": psc.get("fsGroup"),
            "ro_root": bool(sc.get("readOnlyRootFilesystem")),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
            "drop_all": "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
        }

    def mount_script(self) -> str:
        """The shell run inside the container's new mount/UTS namespaces
        before exec: host name, volumes, image, read-only root."""
        lines = ["set -e", "hostname %s" % shlex.quote(self.pod.name)]
        overlaid = set()
        n = 0
        mounts = [(m["mountPath"], self.pod.volume_dir(m["name"]), bool(m.get("readOnly")))
                  for m in self.spec.get("volumeMounts") or []]
        mounts.append((IMAGE_BIN, self.image.dir, True))
        for path, src, ro in mounts:
            if not os.path.isdir(path):
                anc = path
                while not os.path.isdir(anc):
                    anc = posixpath_dir(anc)
                assert anc != "/", "%s: cannot create %s (would need an overlay on /)" % (self.name, path)
                if anc not in overlaid:
                    n += 1
                    up, wk = self.dir / ("ovl%d-upper" % n), self.dir / ("ovl%d-work" % n)
                    up.mkdir()
                    wk.mkdir()
                    lines.append("mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s" % (
                        anc, up, wk, anc))
                    overlaid.add(anc)
                lines.append("mkdir -p %s" % shlex.quote(path))
            lines.append("mount --bind %s %s" % (shlex.quote(str(src)), shlex.quote(path)))
            if ro:
                lines.append("mount -o remount,bind,ro %s" % shlex.quote(path))
        if self.security()["ro_root"]:
            lines.append("mount -o remount,bind,ro /")
        lines.append('exec "$@"')
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        s = self.security()
        priv = ["setpriv", "--reuid", str(s["uid"]), "--regid", str(s["gid"])]
        priv += ["--groups", str(s["fs_group"])] if s["fs_group"] is not None else ["--clear-groups"]
        if s["drop_all"]:
            priv += ["--bounding-set", "-all", "--inh-caps", "-all"]
        if s["no_new_privs"]:
            priv += ["--no-new-privs"]
        env = ["PATH=" + IMAGE_PATH, "HOSTNAME=" + self.pod.name, "HOME=/"]
        env += ["%s=%s" % kv for kv in self.env().items()]
        script = self.dir / "mounts.sh"
        script.write_text(self.mount_script())
        argv = (["ip", "netns", "exec", self.pod.ns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
                 "/bin/sh", str(script)] + priv + ["--", "env", "-i"] + env + self.argv())
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            # `ip netns exec`, `unshare`, sh, setpriv and env all exec: the
            # process started here is the container's main process.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.events["started"] = time.monotonic()
        threading.Thread(target=self._reap, daemon=True, name="reap-%s-%s" % (self.pod.name, self.name)).start()

    def _reap(self):
        self.exit_code = self.proc.wait()
        self.events["exited"] = time.monotonic()
        self.pod.container_exited(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None

    def signal(self, sig: int, what: str) -> None:
        self.events[what] = time.monotonic()
        if self.running:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def lines(self) -> List[dict]:
        """The JSON lines on its stdout so far."""
        out = []
        try:
            text = self.stdout_path.read_text()
        except OSError:
            return out
        for l in text.splitlines():
            l = l.strip()
            if l.startswith("{"):
                try:
                    out.append(json.loads(l))
                except ValueError:
                    pass
        return out

    def stderr_text(self, tail: int = 6000) -> str:
        try:
            return self.stderr_path.read_bytes()[-tail:].decode("utf-8", "replace")
        except OSError:
            return ""

    def http_get(self, get: dict, timeout: float):
        """An httpGet handler (probe or hook) from the node to the pod IP; returns (status, body)."""
        port = resolve_port(self.spec, get.get("port"))
        conn = http.client.HTTPConnection(get.get("host") or self.pod.ip, port, timeout=timeout)
        try:
            conn.request("GET", get.get("path", "/"),
                         headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


class SimPod:
    """One pod of a ReplicaSet: the kubelet's part."""

    def __init__(self, cluster: "Cluster", name: str, template: dict):
        self.cluster = cluster
        self.name = name
        self.spec = template["spec"]
        self.labels = (template.get("metadata") or {}).get("labels") or {}
        self.dir = cluster.workdir / "pods" / name
        self.dir.mkdir(parents=True)
        self.ns = ""
        self.ip = ""
        self.lock = threading.Lock()
        self.ready = False
        self.ready_log: List[tuple] = []   # (time, ready)
        self.terminating = False
        self.terminated = threading.Event()
        self.stop_probes = threading.Event()
        self.events: Dict[str, float] = {}
        self.sidecars: List[Container] = []
        self.apps: List[Container] = []
        for c in self.spec.get("initContainers") or []:
            assert c.get("restartPolicy") == "Always", "%s: run-to-completion init containers are not simulated" % c["name"]
            self.sidecars.append(Container(self, c, cluster.image_for(c), True))
        for c in self.spec.get("containers") or []:
            self.apps.append(Container(self, c, cluster.image_for(c), False))

    @property
    def containers(self) -> List[Container]:
        return self.sidecars + self.apps

    def container(self, name: str) -> Container:
        return next(c for c in self.containers if c.name == name)

    # -- volumes --

    def volume_dir(self, name: str) -> Path:
        return self.dir / "volumes" / name

    def make_volumes(self) -> None:
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for v in self.spec.get("volumes") or []:
            d = self.volume_dir(v["name"])
            d.mkdir(parents=True)
            if "emptyDir" in v:
                d.chmod(0o777)
                continue
            if "configMap" in v:
                obj = self.cluster.find("ConfigMap", v["configMap"]["name"])
                files = {k: val.encode() for k, val in (obj.get("data") or {}).items()}
                mode = v["configMap"].get("defaultMode", 0o644)
            elif "secret" in v:
                obj = self.cluster.find("Secret", v["secret"]["secretName"])
                files = {k: base64.b64decode("".join(val.split())) for k, val in (obj.get("data") or {}).items()}
                mode = v["secret"].get("defaultMode", 0o644)
            else:
                raise AssertionError("volume %s: only emptyDir, configMap and secret are simulated" % v["name"])
            d.chmod(0o755)
            for k, data in files.items():
                f = d / k
                f.write_bytes(data)
                if fs_group is not None:
                    os.chown(f, 0, fs_group)
                f.chmod(mode)

    # -- start --

    def start(self) -> None:
        self.ns, self.ip = self.cluster.network.add_pod(self.name)
        self.make_volumes()
        self.events["created"] = time.monotonic()
        # Native sidecars first, in order; each counts as started once its
        # process runs (no startupProbe here), then the regular containers.
        for c in self.sidecars:
            c.start()
        for c in self.apps:
            c.start()
        for c in self.containers:
            p = c.spec.get("readinessProbe")
            if p:
                threading.Thread(target=self._probe, args=(c, p), daemon=True,
                                 name="probe-%s-%s" % (self.name, c.name)).start()
        self._update_ready()

    def _probe(self, c: Container, p: dict) -> None:
        get = p.get("httpGet")
        assert get, "%s: only httpGet probes are simulated" % c.name
        period = p.get("periodSeconds", 10)
        timeout = p.get("timeoutSeconds", 1)
        fail_n, ok_n = p.get("failureThreshold", 3), p.get("successThreshold", 1)
        fails = oks = 0
        if self.stop_probes.wait(p.get("initialDelaySeconds", 0)):
            return
        while not self.stop_probes.is_set():
            try:
                status, _ = c.http_get(get, timeout)
                good = 200 <= status < 400
            except OSError:
                good = False
            if good:
                oks, fails = oks + 1, 0
                if not c.ready and oks >= ok_n:
                    c.ready = True
                    self._update_ready()
            else:
                fails, oks = fails + 1, 0
                if c.ready and fails >= fail_n:
                    c.ready = False
                    self._update_ready()
            if self.stop_probes.wait(period):
                return

    def _update_ready(self) -> None:
        with self.lock:
            ready = not self.terminating and all(c.running and c.ready for c in self.containers)
            if ready == self.ready:
                return
            self.ready = ready
            self.ready_log.append((time.monotonic(), ready))
        self.cluster.pod_changed(self)

    def container_exited(self, c: Container) -> None:
        self._update_ready()

    # -- termination --

    def terminate(self) -> None:
        """Runs in its own thread; the pod is gone (namespace deleted) at the end."""
        t0 = time.monotonic()
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        deadline = t0 + grace
        self.events["terminating"] = t0
        with self.lock:
            self.terminating = True
            self.ready = False
            self.ready_log.append((t0, False))
        self.cluster.pod_changed(self)  # the endpoint goes, concurrently with preStop
        self.stop_probes.set()

        def stop(c: Container):
            hook = ((c.spec.get("lifecycle") or {}).get("preStop") or {})
            if hook and c.running:
                c.events["prestop_start"] = time.monotonic()
                if "httpGet" in hook:
                    try:
                        c.prestop_result = c.http_get(hook["httpGet"], max(0.1, deadline - time.monotonic()))
                    except OSError as e:
                        c.prestop_result = (None, repr(e).encode())
                elif "exec" in hook:
                    raise AssertionError("exec preStop hooks are not simulated (%s)" % c.name)
                c.events["prestop_end"] = time.monotonic()
            c.signal(signal.SIGTERM, "term")

        def stop_all(group: List[Container]):
            threads = [threading.Thread(target=stop, args=(c,), daemon=True) for c in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            for c in group:
                c.proc and _wait(c.proc, deadline)

        stop_all(self.apps)
        # Sidecars only after every regular container has exited, in reverse order.
        for c in reversed(self.sidecars):
            stop_all([c])
        for c in self.containers:
            if c.running:
                c.signal(signal.SIGKILL, "killed")
        self.events["killed_at_grace"] = float(any("killed" in c.events for c in self.containers))
        for c in self.containers:
            if c.proc:
                c.proc.wait()
        self.events["terminated"] = time.monotonic()
        self.cluster.network.remove_pod(self.ns)
        self.terminated.set()


def _wait(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------
# the cluster and the Deployment controller
# ---------------------------------------------------------------------------

class Cluster:
    def __init__(self, workdir: Path, sock_dir: Path, docs: List[dict], baton_bin: str, propagation_s: float):
        self.workdir = workdir
        self.docs = docs
        self.baton_bin = baton_bin
        self.network = Network()
        self.scheduler = Scheduler()
        self.images: Dict[str, Image] = {}
        self.pods: Dict[str, SimPod] = {}
        self.cv = threading.Condition()
        self.deployment = next(d for d in docs if d["kind"] == "Deployment")
        tmpl = self.deployment["spec"]["template"]
        svc = next(d for d in docs if d["kind"] == "Service")
        target = svc["spec"]["ports"][0]["targetPort"]
        containers = (tmpl["spec"].get("initContainers") or []) + tmpl["spec"]["containers"]
        port = next((p for c in containers for p in [resolve_port(c, target)] if p), None)
        assert port, "the Service's targetPort %r is no container's port" % target
        self.service = Service(workdir, sock_dir, self.network, svc, port, propagation_s, self.scheduler)

    def find(self, kind: str, name: str) -> dict:
        obj = next((d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
        assert obj is not None, "no %s %s in the rendered manifests" % (kind, name)
        return obj

    def image_for(self, c: dict) -> Image:
        ref = c["image"]
        if ref not in self.images:
            repo = ref.split("@")[0].rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref.split("@")[0]
            if repo.rsplit("/", 1)[-1] == "baton":
                self.images[ref] = baton_image(self.workdir, self.baton_bin, ref)
            elif repo.rsplit("/", 1)[-1] == "http-echo":
                self.images[ref] = app_image(self.workdir, ref)
            else:
                raise AssertionError("no stand-in for image %s" % ref)
        return self.images[ref]

    def up(self) -> None:
        self.network.up()
        self.service.start()

    def down(self) -> List[str]:
        for p in self.pods.values():
            for c in p.containers:
                if c.running:
                    c.signal(signal.SIGKILL, "killed")
            p.stop_probes.set()
        self.scheduler.stop()
        self.service.stop()
        return self.network.down()

    def pod_changed(self, pod: SimPod) -> None:
        self.service.update(pod, pod.ready and not pod.terminating)
        with self.cv:
            self.cv.notify_all()

    def new_pod(self, template_hash: str) -> SimPod:
        name = "%s-%s-%s" % (self.deployment["metadata"]["name"], template_hash,
                             "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5)))
        pod = SimPod(self, name, self.deployment["spec"]["template"])
        self.pods[name] = pod
        pod.start()
        return pod

    def terminate(self, pod: SimPod) -> threading.Thread:
        t = threading.Thread(target=pod.terminate, daemon=True, name="terminate-" + pod.name)
        t.start()
        return t


def _int_or_percent(v, total: int, round_up: bool) -> int:
    if isinstance(v, str) and v.endswith("%"):
        x = int(v[:-1]) * total / 100.0
        return int(-(-x // 1)) if round_up else int(x)
    return int(v)


class Deployment:
    """The Deployment controller's rolling update, for one Deployment."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        spec = cluster.deployment["spec"]
        self.replicas = spec.get("replicas", 1)
        ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        self.max_surge = _int_or_percent(ru.get("maxSurge", "25%"), self.replicas, True)
        self.max_unavailable = _int_or_percent(ru.get("maxUnavailable", "25%"), self.replicas, False)
        assert self.max_surge + self.max_unavailable > 0
        self.generation = 0
        self.current: List[SimPod] = []      # pods of the current ReplicaSet
        self.terminations: List[threading.Thread] = []

    def _hash(self) -> str:
        self.generation += 1
        return "%09x" % random.getrandbits(36)

    def create(self, timeout: float = 60) -> None:
        """The first ReplicaSet: every replica started and Ready."""
        h = self._hash()
        self.current = [self.cluster.new_pod(h) for _ in range(self.replicas)]
        self._wait(lambda: all(p.ready for p in self.current), timeout, "every pod to be Ready")

    def rollout_restart(self, timeout: float = 300) -> Dict[str, float]:
        """`kubectl rollout restart`: a new ReplicaSet replaces the old one
        within maxSurge/maxUnavailable; terminating pods count for neither.
        Returns when every new pod is Ready and every old pod is gone."""
        h = self._hash()
        old = list(self.current)
        new: List[SimPod] = []
        t0 = time.monotonic()
        deadline = t0 + scaled(timeout)
        while old or len(new) < self.replicas or not all(p.ready for p in new):
            assert time.monotonic() < deadline, "rollout did not finish in %ss" % timeout
            with self.cluster.cv:
                # scale the new ReplicaSet up as far as maxSurge allows
                while len(new) < self.replicas and len(old) + len(new) < self.replicas + self.max_surge:
                    new.append(self.cluster.new_pod(h))
                # scale the old one down as far as maxUnavailable allows
                available = sum(1 for p in old + new if p.ready)
                while old:
                    victim = next((p for p in old if not p.ready), old[0])  # not-ready pods go first
                    if available - (1 if victim.ready else 0) < self.replicas - self.max_unavailable:
                        break
                    old.remove(victim)
                    available -= 1 if victim.ready else 0
                    self.terminations.append(self.cluster.terminate(victim))
                self.cluster.cv.wait(0.05)
        t_pods = time.monotonic()
        for t in self.terminations:
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), "a pod's termination did not end"
        self.current = new
        return {"new_pods_ready_s": t_pods - t0, "total_s": time.monotonic() - t0}

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        wait_until(pred, timeout, interval=0.05, what=what)
