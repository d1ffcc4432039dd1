"""The shipped Kubernetes manifests as data: k8s/ rendered with `kubectl
kustomize` (development secrets from scripts/k8s-secrets.sh) and a small
model of the pods in it (containers, volumes, the baton.yaml each baton
container loads). Used by test_k8s_manifests.py (the checks) and
rollout/ (the simulation that runs what is shipped)."""

from __future__ import annotations

import base64
import os
import posixpath
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


# baton's defaults for the keys these checks read (docs/configuration.md).
DEFAULT_LISTEN = "0.0.0.0:7443"
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_SOCKET = "/run/baton/handoff.sock"
DEFAULT_GRACE_MS = 30000
DEFAULT_DELAY_MS = 5000
POD_OWNERS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def kustomization_dirs(top: Path) -> List[Path]:
    """Every directory under top (top included) holding a kustomization."""
    out = []
    for d, dirs, files in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x != "secrets" and not x.startswith("."))
        if any(f in files for f in KUSTOMIZATION_FILES):
            out.append(Path(d))
    return sorted(out)



KUSTOMIZATIONS = [str(d.relative_to(ROOT)) for d in kustomization_dirs(K8S)]


@dataclass
class Rendered:
    name: str        # k8s/examples/hot-upgrade
    text: str        # kubectl kustomize output
    docs: List[dict]


def place_secrets(tree: Path, generated: Path) -> None:
    """Copies the generated secret files to wherever a kustomization's
    generators read a missing one, by file name (k8s/base/secrets/tls.crt, ...)."""
    for d in kustomization_dirs(tree):
        kfile = next(d / f for f in KUSTOMIZATION_FILES if (d / f).exists())
        k = yaml.safe_load(kfile.read_text()) or {}
        for gen in (k.get("secretGenerator") or []) + (k.get("configMapGenerator") or []):
            for entry in (gen.get("files") or []) + (gen.get("envs") or []):
                src = d / entry.split("=", 1)[-1]
                if not src.exists() and (generated / src.name).exists():
                    src.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(generated / src.name, src)


def render_all(workdir: Path, baton_bin: str, names: List[str] = None,
               dns_names: Tuple[str, ...] = ("tunnel-app.example.com",)) -> Tuple[Dict[str, Rendered], Path]:
    """Renders the kustomizations `names` (default: all) in a copy of k8s/
    under workdir, with new development secrets for dns_names; returns the
    renderings and the directory of the generated secret files (ca.crt and
    client-token are there for clients)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found (scripts/deps.sh --k8s installs kubernetes-client)"
    tree = workdir / "tree"
    # a copy without any real secrets a developer may keep in k8s/**/secrets/
    shutil.copytree(K8S, tree / "k8s", ignore=shutil.ignore_patterns("secrets"))
    gen = workdir / "generated-secrets"
    r = subprocess.run(["sh", str(ROOT / "scripts" / "k8s-secrets.sh"), str(gen)] + list(dns_names),
                       capture_output=True, text=True, env=dict(os.environ, BATON_BIN=baton_bin), timeout=60)
    assert r.returncode == 0, "scripts/k8s-secrets.sh failed: %s%s" % (r.stdout, r.stderr)
    place_secrets(tree / "k8s", gen)
    out = {}
    for name in names or KUSTOMIZATIONS:
        r = subprocess.run([kubectl, "kustomize", str(tree / name)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, "kubectl kustomize %s failed:\n%s" % (name, r.stderr)
        docs = [d for d in yaml.safe_load_all(r.stdout) if d is not None]
        out[name] = Rendered(name, r.stdout, docs)
    return out, gen


def host_port(addr: str) -> Tuple[str, int]:
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]*):(\d+)", str(addr))
    assert m, "not host:port: %r" % addr
    return (m.group(1), int(m.group(2))) if m.group(1) is not None else (m.group(3), int(m.group(4)))


def sub(cfg: dict, *keys, default=None):
    for k in keys:
        if not isinstance(cfg, dict) or cfg.get(k) is None:
            return default
        cfg = cfg[k]
    return cfg


@dataclass
class Config:
    path: str            # where the container reads it
    text: str
    cfg: dict

    @property
    def listen_port(self) -> int:
        return host_port(sub(self.cfg, "listen", default=DEFAULT_LISTEN))[1]

    @property
    def admin(self) -> Tuple[str, int]:
        return host_port(sub(self.cfg, "admin", "listen", default=DEFAULT_ADMIN))

    @property
    def lifecycle(self) -> Optional[Tuple[str, int]]:
        v = sub(self.cfg, "lifecycle", "listen")
        return host_port(v) if v is not None else None

    @property
    def socket(self) -> str:
        return sub(self.cfg, "handoff", "socket", default=DEFAULT_SOCKET)

    @property
    def grace_ms(self) -> int:
        return sub(self.cfg, "drain", "grace_ms", default=DEFAULT_GRACE_MS)

    @property
    def delay_ms(self) -> int:
        return sub(self.cfg, "drain", "delay_ms", default=DEFAULT_DELAY_MS)


@dataclass
class Pod:
    owner: str                       # Deployment/tunnel-app
    spec: dict
    labels: dict
    docs: List[dict]                 # every rendered object (ConfigMaps, Secrets, Services, ...)
    batons: List[dict] = field(default_factory=list)
    apps: List[dict] = field(default_factory=list)

    def find(self, kind: str, name: str) -> Optional[dict]:
        return next((d for d in self.docs if d.get("kind") == kind and d["metadata"].get("name") == name), None)

    def volume(self, name: str) -> dict:
        return next((v for v in self.spec.get("volumes") or [] if v.get("name") == name), {})

    def mount_for(self, c: dict, path: str) -> Optional[dict]:
        """The volume mount of container c that holds path (the deepest)."""
        best = None
        for m in c.get("volumeMounts") or []:
            mp = m["mountPath"].rstrip("/") or "/"
            if path == mp or path.startswith(mp + "/") or mp == "/":
                if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                    best = m
        return best

    def read(self, c: dict, path: str) -> Optional[bytes]:
        """The content of file `path` in container c, from its ConfigMap or
        Secret volume as the kubelet would project it; None if not there."""
        m = self.mount_for(c, path)
        if m is None:
            return None
        rel = posixpath.relpath(path, m["mountPath"])
        if m.get("subPath"):
            rel = m["subPath"] if rel == "." else posixpath.join(m["subPath"], rel)
        vol = self.volume(m["name"])
        if "configMap" in vol:
            src, obj = vol["configMap"], self.find("ConfigMap", vol["configMap"].get("name"))
        elif "secret" in vol:
            src, obj = vol["secret"], self.find("Secret", vol["secret"].get("secretName"))
        else:
            return None
        if obj is None:
            return None
        items = src.get("items")
        key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
        if key is None:
            return None
        if key in (obj.get("data") or {}):
            v = obj["data"][key]
            return base64.b64decode("".join(v.split())) if obj["kind"] == "Secret" else v.encode()
        if key in (obj.get("binaryData") or {}):
            return base64.b64decode("".join(obj["binaryData"][key].split()))
        return None

    def config_path(self, c: dict) -> Optional[str]:
        argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        for i, a in enumerate(argv):
            if a in ("-c", "--config") and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith("--config="):
                return a.split("=", 1)[1]
        return None

    def config(self, c: dict) -> Config:
        path = self.config_path(c)
        assert path, "%s: %s: no `-c FILE` in its command line" % (self.owner, c["name"])
        data = self.read(c, path)
        assert data is not None, "%s: %s: %s is in no ConfigMap or Secret volume it mounts" % (self.owner, c["name"], path)
        text = data.decode()
        return Config(path, text, yaml.safe_load(text) or {})


def is_baton(c: dict) -> bool:
    """A baton container: its image is baton's (after kustomize's images:)."""
    image = str(c.get("image", ""))
    repo = image.split("@")[0]
    repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
    return repo.rsplit("/", 1)[-1] == "baton"


def pods_of(docs: List[dict]) -> List[Pod]:
    out = []
    for d in docs:
        if d.get("kind") in POD_OWNERS:
            tmpl = d["spec"]["template"]
        elif d.get("kind") == "Pod":
            tmpl = d
        else:
            continue
        spec = tmpl.get("spec") or {}
        pod = Pod("%s/%s" % (d["kind"], d["metadata"]["name"]), spec, (tmpl.get("metadata") or {}).get("labels") or {}, docs)
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            if is_baton(c):
                pod.batons.append(c)
        pod.apps = [c for c in spec.get("containers") or [] if not is_baton(c)]
        out.append(pod)
    return out


def resolve_port(c: dict, port) -> Optional[int]:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return next((p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port), None)


