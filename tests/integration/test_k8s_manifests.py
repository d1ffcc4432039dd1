"""The Kubernetes manifests in k8s/, checked offline (docs/kubernetes.md).

Every kustomization under k8s/ (k8s/ itself, k8s/base/, k8s/examples/*/) is
rendered with `kubectl kustomize` in a copy of the tree, with development
secrets from scripts/k8s-secrets.sh, and then:

1. validated against the Kubernetes API schema by tests/k8s/validate.mjs
   (kubernetes-models, pinned in tests/k8s/package-lock.json: the OpenAPI
   schema of each kind, plus a strict unknown-field check derived from the
   same package); a negative test proves it rejects a wrong type and an
   unknown field;
2. checked against baton's own rules, reading the baton.yaml each baton
   container really loads (its `-c` file, found through its volume mounts in
   the rendered ConfigMap): native sidecar; probes on admin.listen's port;
   container and Service ports; the application's preStop hook and its token;
   terminationGracePeriodSeconds against the drain; the handoff socket on a
   shared emptyDir; security context; resources; and `baton check` on that
   configuration with the files of the rendered Secret where the container
   would see them. Negative tests break each rule in a copy of the rendered
   objects and expect the rule to say so.

Needs node and npm (skipped without them; `make test` installs them with
scripts/deps.sh --k8s, which also runs tests/k8s/install.sh) and kubectl.

Run once per `make test`: the sanitizer passes (BATON_TEST_SANITIZED=1) skip
this file. Nothing here depends on how baton was built; the configuration
parser under the sanitizers is covered by the unit tests.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import posixpath
import re
import shutil
import subprocess
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import yaml

from conftest import BATON_BIN, SANITIZED
from k8s_model import KUSTOMIZATIONS, ROOT, Pod, Rendered, pods_of, render_all, resolve_port, sub

TOOLS = ROOT / "tests" / "k8s"
VALIDATE = TOOLS / "validate.mjs"

pytestmark = pytest.mark.skipif(
    SANITIZED, reason="manifest checks run once, in the release pass; they do not depend on the build")

# The lifecycle hook answers 504 at drain.grace_ms + 5 s if the drain is not
# over (docs/operations.md): the kubelet must not kill the pod before that.
LIFECYCLE_HOOK_SLACK_MS = 5000
# Files a configuration names (paths relative to the configuration's directory).
CONFIG_FILES = (("tls", "cert"), ("tls", "key"), ("tls", "client_ca"), ("tls", "ticket_key"), ("auth", "tokens_file"))


# ---------------------------------------------------------------------------
# tools and rendering
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator() -> List[str]:
    """argv prefix of the validator, its packages installed (npm ci if needed)."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    if missing:
        pytest.skip("%s not installed: the schema validator runs on Node.js (scripts/deps.sh --k8s installs it)"
                    % " and ".join(missing))
    r = subprocess.run(["sh", str(TOOLS / "install.sh")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "tests/k8s/install.sh (npm ci) failed:\n%s%s" % (r.stdout, r.stderr)
    return [shutil.which("node"), str(VALIDATE)]


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="baton-k8s-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def rendered(workdir) -> Dict[str, Rendered]:
    return render_all(workdir, BATON_BIN)[0]


def run_validator(validator, text: str, workdir: Path, label: str) -> Tuple[int, List[str], str]:
    f = workdir / ("%s.yaml" % label.replace("/", "_"))
    f.write_text(text)
    r = subprocess.run(validator + [str(f)], capture_output=True, text=True, timeout=60)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    return r.returncode, lines, r.stderr


# ---------------------------------------------------------------------------
# 1. the Kubernetes API schema
# ---------------------------------------------------------------------------

def test_every_kustomization_is_found():
    assert "k8s" in KUSTOMIZATIONS, KUSTOMIZATIONS
    assert len(KUSTOMIZATIONS) >= 2, "k8s/ and at least its base: %s" % KUSTOMIZATIONS


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_schema(validator, rendered, workdir, name):
    rc, lines, err = run_validator(validator, rendered[name].text, workdir, name)
    assert rc == 0 and not lines, "%s does not validate:\n%s\n%s" % (name, "\n".join(lines), err)
    kinds = sorted({d["kind"] for d in rendered[name].docs})
    assert "Deployment" in kinds, kinds
    assert re.search(r"validate\.mjs: %d objects, 0 problems" % len(rendered[name].docs), err), err


def test_validator_catches_wrong_types_and_unknown_fields(validator, rendered, workdir):
    docs = copy.deepcopy(rendered["k8s"].docs)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    svc = next(d for d in docs if d["kind"] == "Service")
    dep["spec"]["replicas"] = "three"                                        # wrong type
    baton = dep["spec"]["template"]["spec"]["initContainers"][0]
    baton["imagePullPolcy"] = "Always"                                       # unknown field (a typo)
    baton["readinessProbe"]["httpGet"]["pth"] = "/readyz"                    # unknown field, deeper
    baton["ports"][0]["protocol"] = "QUIC"                                   # not in the enum
    dep["spec"]["template"]["spec"]["volumes"][-1]["emptyDir"]["sizeLimit"] = "lots"   # not a quantity
    dep["spec"]["template"]["metadata"]["labels"]["fine.example/any-key"] = "x"        # a map: any key is fine
    svc["spec"]["ports"][0]["targetPort"] = [7443]                           # IntOrString, neither
    svc["spec"]["selectr"] = {}                                              # unknown field
    text = yaml.safe_dump_all(docs, sort_keys=False)
    rc, lines, err = run_validator(validator, text, workdir, "broken")
    f = str(workdir / "broken.yaml")
    expected = [
        "%s: Deployment/tunnel-app: spec.replicas: must be integer" % f,
        '%s: Deployment/tunnel-app: spec.template.spec.initContainers[0].imagePullPolcy: unknown field "imagePullPolcy" (did you mean "imagePullPolicy"?)' % f,
        '%s: Deployment/tunnel-app: spec.template.spec.initContainers[0].readinessProbe.httpGet.pth: unknown field "pth" (did you mean "path"?)' % f,
        '%s: Deployment/tunnel-app: spec.template.spec.initContainers[0].ports[0].protocol: must be equal to one of the allowed values ("SCTP", "TCP", "UDP")' % f,
        '%s: Deployment/tunnel-app: spec.template.spec.volumes[2].emptyDir.sizeLimit: must be number, or must match format "quantity"' % f,
        "%s: Service/tunnel-app: spec.ports[0].targetPort: must be string, or must be integer" % f,
        '%s: Service/tunnel-app: spec.selectr: unknown field "selectr" (did you mean "selector"?)' % f,
    ]
    assert rc == 1, (rc, lines, err)
    assert sorted(lines) == sorted(expected), "\n".join(lines)

    # stdin, an unknown kind, a YAML error, a document that is not an object
    bad = "apiVersion: apps.kruise.io/v1alpha1\nkind: SidecarSet\nmetadata: {name: s}\n---\n- 1\n---\na: [1\n"
    r = subprocess.run(validator + ["-"], input=bad, capture_output=True, text=True, timeout=60)
    out = r.stdout.splitlines()
    assert r.returncode == 1, r
    assert out[0] == ('<stdin>: SidecarSet/s: (top level): no schema for apiVersion "apps.kruise.io/v1alpha1" '
                      'kind "SidecarSet" in kubernetes-models'), out
    assert out[1] == "<stdin>: document 2: (top level): expected a Kubernetes object (a mapping)", out
    assert out[2].startswith("<stdin>: document 3: YAML: "), out
    assert len(out) == 3, out


# ---------------------------------------------------------------------------
# 2. baton's rules
# ---------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rule_native_sidecar(pod: Pod) -> List[str]:
    out = []
    inits = pod.spec.get("initContainers") or []
    for c in pod.batons:
        if not any(c is i for i in inits) or c.get("restartPolicy") != "Always":
            out.append("%s: %s: baton must be a native sidecar (an initContainer with restartPolicy: Always), "
                       "so it starts before the application and stops after it" % (pod.owner, c["name"]))
    return out


def rule_probes(pod: Pod) -> List[str]:
    out = []
    for c in pod.batons:
        conf = pod.config(c)
        host, admin_port = conf.admin
        who = "%s: %s" % (pod.owner, c["name"])
        if is_loopback(host):
            out.append("%s: admin.listen %s is loopback: httpGet probes come to the pod IP" % (who, host))
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            p = c.get(probe)
            get = (p or {}).get("httpGet")
            if not get:
                out.append("%s: %s must be httpGet %s on the admin port" % (who, probe, path))
                continue
            if get.get("path") != path:
                out.append("%s: %s.httpGet.path is %r, expected %r" % (who, probe, get.get("path"), path))
            port = resolve_port(c, get.get("port"))
            if port != admin_port:
                out.append("%s: %s.httpGet.port %r is port %s, but admin.listen is on %d"
                           % (who, probe, get.get("port"), port, admin_port))
            if get.get("scheme", "HTTP") != "HTTP" or get.get("host"):
                out.append("%s: %s.httpGet must be plain HTTP to the pod IP (no scheme/host)" % (who, probe))
            if p.get("failureThreshold", 3) < 2:
                out.append("%s: %s.failureThreshold is %d: give probes at least 2, a hot restart may refuse one "
                           "request (docs/operations.md, the admin API)" % (who, probe, p["failureThreshold"]))
        r = c.get("readinessProbe") or {}
        notice_ms = 1000 * r.get("periodSeconds", 10) * r.get("failureThreshold", 3)
        if r.get("httpGet") and notice_ms > conf.delay_ms:
            out.append("%s: readinessProbe notices a drain only after periodSeconds x failureThreshold = %d ms, "
                       "more than drain.delay_ms (%d ms), after which the listener closes"
                       % (who, notice_ms, conf.delay_ms))
    return out


def rule_container_ports(pod: Pod) -> List[str]:
    out = []
    for c in pod.batons:
        conf = pod.config(c)
        want = {"listen": conf.listen_port, "admin.listen": conf.admin[1]}
        if conf.lifecycle:
            want["lifecycle.listen"] = conf.lifecycle[1]
        have = {p["containerPort"] for p in c.get("ports") or [] if p.get("protocol", "TCP") == "TCP"}
        for key, port in want.items():
            if port not in have:
                out.append("%s: %s: no containerPort %d (%s)" % (pod.owner, c["name"], port, key))
        for port in sorted(have - set(want.values())):
            out.append("%s: %s: containerPort %d is none of baton's listeners %s" % (pod.owner, c["name"], port, want))
    return out


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def rule_service_and_selectors(pod: Pod) -> List[str]:
    out = []
    if not pod.batons:
        return out
    owner = next(d for d in pod.docs if "%s/%s" % (d["kind"], d["metadata"]["name"]) == pod.owner)
    if owner["kind"] != "Pod":
        sel = owner["spec"].get("selector") or {}
        if sel.get("matchExpressions") or not selects(sel.get("matchLabels") or {}, pod.labels):
            out.append("%s: spec.selector does not select its own pod template's labels" % pod.owner)
    listen = {pod.config(c).listen_port for c in pod.batons}
    regular = pod.spec.get("containers") or []
    everyone = regular + (pod.spec.get("initContainers") or [])
    services = [d for d in pod.docs if d["kind"] == "Service" and selects(d["spec"].get("selector") or {}, pod.labels)]
    if not services:
        out.append("%s: no Service selects this pod" % pod.owner)
    for svc in services:
        who = "Service/%s" % svc["metadata"]["name"]
        if svc["spec"].get("publishNotReadyAddresses"):
            out.append("%s: publishNotReadyAddresses would route to draining pods" % who)
        targets = set()
        for p in svc["spec"].get("ports") or []:
            tp = p.get("targetPort", p["port"])
            if isinstance(tp, str) and not tp.isdigit():
                port = next((resolve_port(c, tp) for c in regular if resolve_port(c, tp)), None)
                if port is None:
                    port = next((resolve_port(c, tp) for c in everyone if resolve_port(c, tp)), None)
                    out.append("%s: targetPort %r %s" % (who, tp, (
                        "is named only on a native sidecar: Services resolve sidecar port names only from "
                        "Kubernetes 1.32 on (kubernetes/kubernetes#127958); use the number"
                        if port else "is no container's port name")))
            else:
                port = int(tp)
            targets.add(port)
        if not targets & listen:
            out.append("%s: no port targets baton's listener (port %s)" % (who, sorted(listen)))
    for pdb in (d for d in pod.docs if d["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"].get("selector") or {}
        if not sel.get("matchExpressions") and not selects(sel.get("matchLabels") or {}, pod.labels):
            out.append("PodDisruptionBudget/%s: its selector does not select %s's pods" % (pdb["metadata"]["name"], pod.owner))
    return out


def rule_prestop(pod: Pod) -> List[str]:
    out = []
    if not pod.batons:
        return out
    if not pod.apps:
        out.append("%s: no application container" % pod.owner)
    for conf in {pod.config(c).path: pod.config(c) for c in pod.batons}.values():
        if not conf.lifecycle:
            out.append("%s: %s sets no lifecycle.listen: the application's preStop hook has nothing to call "
                       "(a native sidecar gets TERM only after the application has exited)" % (pod.owner, conf.path))
            continue
        host, port = conf.lifecycle
        if is_loopback(host):
            out.append("%s: lifecycle.listen %s is loopback: the kubelet's httpGet hook comes to the pod IP" % (pod.owner, host))
        digest = str(sub(conf.cfg, "lifecycle", "token_sha256", default="")).lower()
        for c in pod.apps:
            who = "%s: %s" % (pod.owner, c["name"])
            get = ((c.get("lifecycle") or {}).get("preStop") or {}).get("httpGet")
            if not get:
                out.append("%s: lifecycle.preStop must be httpGet GET /drain on baton's lifecycle port %d" % (who, port))
                continue
            if get.get("path") != "/drain":
                out.append("%s: preStop.httpGet.path is %r, expected '/drain'" % (who, get.get("path")))
            if resolve_port(c, get.get("port")) != port:
                out.append("%s: preStop.httpGet.port %r is not lifecycle.listen's port %d" % (who, get.get("port"), port))
            if get.get("scheme", "HTTP") != "HTTP" or get.get("host"):
                out.append("%s: preStop.httpGet must be plain HTTP to the pod IP (no scheme/host)" % who)
            tokens = [h.get("value", "") for h in get.get("httpHeaders") or [] if h.get("name", "").lower() == "x-baton-token"]
            if len(tokens) != 1:
                out.append("%s: preStop.httpGet needs one X-Baton-Token header, has %d" % (who, len(tokens)))
            elif hashlib.sha256(tokens[0].encode()).hexdigest() != digest:
                out.append("%s: the X-Baton-Token header's sha256 is not lifecycle.token_sha256 of %s (401: no drain)"
                           % (who, conf.path))
    return out


def rule_grace_period(pod: Pod) -> List[str]:
    out = []
    tgps = pod.spec.get("terminationGracePeriodSeconds", 30)
    for c in pod.batons:
        conf = pod.config(c)
        need = conf.delay_ms + conf.grace_ms
        why = "drain.delay_ms + drain.grace_ms = %d ms" % need
        if conf.lifecycle and conf.grace_ms + LIFECYCLE_HOOK_SLACK_MS > need:
            need = conf.grace_ms + LIFECYCLE_HOOK_SLACK_MS
            why = "drain.grace_ms + 5 s = %d ms (when the lifecycle hook gives up)" % need
        if not tgps * 1000 > need:
            out.append("%s: terminationGracePeriodSeconds %d must exceed %s for %s"
                       % (pod.owner, tgps, why, c["name"]))
    return out


def rule_handoff_volume(pod: Pod) -> List[str]:
    out = []
    seen = {}
    for c in pod.batons:
        who = "%s: %s" % (pod.owner, c["name"])
        sock = pod.config(c).socket
        m = pod.mount_for(c, posixpath.dirname(sock))
        if m is None or m["mountPath"].rstrip("/") in ("", "/"):
            out.append("%s: handoff.socket %s is on no volume (the root filesystem is read-only)" % (who, sock))
            continue
        if not isinstance(pod.volume(m["name"]).get("emptyDir"), dict):
            out.append("%s: handoff.socket %s is on volume %r, not an emptyDir" % (who, sock, m["name"]))
        if m.get("readOnly") or m.get("subPath"):
            out.append("%s: the handoff volume %r must be mounted writable and whole" % (who, m["name"]))
        seen[c["name"]] = (m["name"], m["mountPath"].rstrip("/"), sock)
    if len(set(seen.values())) > 1:
        out.append("%s: the baton containers must share the handoff socket (same volume, mount path and "
                   "handoff.socket) for a hot upgrade from one to the other: %s" % (pod.owner, seen))
    return out


def rule_security(pod: Pod) -> List[str]:
    out = []
    psc = pod.spec.get("securityContext") or {}
    for c in pod.batons:
        sc = c.get("securityContext") or {}
        who = "%s: %s" % (pod.owner, c["name"])
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if non_root is not True or uid == 0:
            out.append("%s: must run as non-root (runAsNonRoot: true, runAsUser not 0)" % who)
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append("%s: securityContext.readOnlyRootFilesystem must be true" % who)
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            out.append("%s: securityContext.allowPrivilegeEscalation must be false (and not privileged)" % who)
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []) or (sc.get("capabilities") or {}).get("add"):
            out.append("%s: securityContext.capabilities must drop ALL and add none" % who)
    return out


QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
SUFFIX = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(v) -> Decimal:
    m = QUANTITY.fullmatch(str(v))
    assert m, "not a quantity: %r" % v
    return Decimal(m.group(1)) * SUFFIX[m.group(2)]


def rule_resources(pod: Pod) -> List[str]:
    out = []
    for c in pod.batons:
        r = c.get("resources") or {}
        for res in ("cpu", "memory"):
            req, lim = (r.get("requests") or {}).get(res), (r.get("limits") or {}).get(res)
            if req is None or lim is None:
                out.append("%s: %s: resources.requests and .limits must both set %s" % (pod.owner, c["name"], res))
            elif quantity(req) > quantity(lim):
                out.append("%s: %s: %s request %s exceeds its limit %s" % (pod.owner, c["name"], res, req, lim))
    return out


def image_tag(image: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(repository, tag, digest) of an image reference."""
    image, _, digest = image.partition("@")
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag, digest or None
    return image, None, digest or None


def rule_images(pod: Pod) -> List[str]:
    """kustomize's images: reached every baton container (a container added by
    an overlay's patch is not rewritten by its base's images:)."""
    out = []
    for c in pod.batons:
        repo, tag, digest = image_tag(str(c.get("image", "")))
        if "/" not in repo or not (digest or (tag and tag != "latest")):
            out.append("%s: %s: image %r is not a pinned registry image (set by kustomize's images:)"
                       % (pod.owner, c["name"], c.get("image")))
    if len({c.get("image") for c in pod.batons}) > 1:
        out.append("%s: the baton containers start from different images: %s"
                   % (pod.owner, {c["name"]: c.get("image") for c in pod.batons}))
    return out


def rule_resume_advertise(pod: Pod) -> List[str]:
    """Behind a Service a resume may land on another replica: each baton
    advertises its pod's own address (docs/protocol.md 9.2), the pod IP from
    the Downward API and the tunnel port, which Kubernetes expands in args."""
    out = []
    for c in pod.batons:
        who = "%s: %s" % (pod.owner, c["name"])
        argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        want = "$(POD_IP):%d" % pod.config(c).listen_port
        if "--resume-advertise" not in argv or argv.index("--resume-advertise") + 1 >= len(argv) or \
                argv[argv.index("--resume-advertise") + 1] != want:
            out.append("%s: no `--resume-advertise %s` in its command line" % (who, want))
        env = {e.get("name"): e for e in c.get("env") or []}
        src = ((env.get("POD_IP") or {}).get("valueFrom") or {}).get("fieldRef") or {}
        if src.get("fieldPath") != "status.podIP":
            out.append("%s: env POD_IP does not come from fieldRef status.podIP" % who)
    return out


RULES = [rule_images, rule_native_sidecar, rule_probes, rule_container_ports, rule_service_and_selectors, rule_prestop,
         rule_grace_period, rule_handoff_volume, rule_security, rule_resources, rule_resume_advertise]


def baton_pods(r: Rendered) -> List[Pod]:
    return [p for p in pods_of(r.docs) if p.batons]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("rule", RULES, ids=[r.__name__[5:] for r in RULES])
def test_baton_rule(rendered, name, rule):
    pods = baton_pods(rendered[name])
    assert pods, "%s renders no pod with a baton container" % name
    problems = [p for pod in pods for p in rule(pod)]
    assert not problems, "\n".join(problems)


def test_hot_upgrade_examples_have_two_batons(rendered):
    """Where a kustomization is a hot-upgrade example, its pod really has two
    baton containers (and rule_handoff_volume then holds them to one socket)."""
    examples = [n for n in KUSTOMIZATIONS if "hot-upgrade" in n]
    for name in examples:
        for pod in baton_pods(rendered[name]):
            assert len(pod.batons) == 2, (name, [c["name"] for c in pod.batons])
    for name in set(KUSTOMIZATIONS) - set(examples):
        for pod in baton_pods(rendered[name]):
            assert len(pod.batons) == 1, (name, [c["name"] for c in pod.batons])


def materialize(pod: Pod, c: dict, root: Path) -> Path:
    """Writes the container's baton.yaml and the files it names under root
    (root + their path in the container), with absolute paths rewritten to
    there; returns the configuration file."""
    conf = pod.config(c)
    text = conf.text
    cdir = posixpath.dirname(conf.path)
    for keys in CONFIG_FILES:
        v = sub(conf.cfg, *keys)
        if v is None:
            continue
        path = posixpath.normpath(posixpath.join(cdir, str(v)))
        data = pod.read(c, path)
        assert data is not None, "%s: %s: %s (%s) is in no ConfigMap or Secret volume mounted in the container" % (
            pod.owner, c["name"], ".".join(keys), path)
        dst = root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        if posixpath.isabs(str(v)):
            text, n = re.subn(r"(?<=[\s\"':])%s(?=[\s\"']|$)" % re.escape(str(v)), str(dst), text, flags=re.M)
            assert n == 1, "%s appears %d times in %s" % (v, n, conf.path)
    cfile = root / conf.path.lstrip("/")
    cfile.parent.mkdir(parents=True, exist_ok=True)
    cfile.write_text(text)
    return cfile


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_baton_check_loads_the_configuration(rendered, workdir, name):
    """`baton check` on the configuration each baton container loads, with the
    certificate, key, ticket key and token digests of the rendered Secret."""
    for pod in baton_pods(rendered[name]):
        for c in pod.batons:
            root = Path(tempfile.mkdtemp(prefix="check-", dir=workdir))
            cfile = materialize(pod, c, root)
            r = subprocess.run([BATON_BIN, "check", "-c", str(cfile)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, "%s: %s: baton check %s:\n%s%s" % (
                name, c["name"], pod.config(c).path, r.stdout, r.stderr)
            assert ": ok (" in r.stdout, r.stdout


# ---------------------------------------------------------------------------
# the rules catch what they are for
# ---------------------------------------------------------------------------

def mutated(rendered, name, change) -> Pod:
    docs = copy.deepcopy(rendered[name].docs)
    pods = baton_pods(Rendered(name, "", docs))
    change(pods[0], docs)
    return baton_pods(Rendered(name, "", docs))[0]


def set_config(pod: Pod, docs: List[dict], edit) -> None:
    conf = pod.config(pod.batons[0])
    cm_name = next(v["configMap"]["name"] for v in pod.spec["volumes"] if "configMap" in v)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    key = posixpath.basename(conf.path)
    cm["data"][key] = edit(cm["data"][key])


def container(pod: Pod, name: str) -> dict:
    return next(c for c in (pod.spec.get("initContainers") or []) + pod.spec["containers"] if c["name"] == name)


BREAKS = [
    # (rule, kustomization, description, change(pod, docs), expected text)
    (rule_resume_advertise, "k8s", "no POD_IP",
     lambda p, d: p.batons[0].pop("env"), "env POD_IP does not come from fieldRef status.podIP"),
    (rule_resume_advertise, "k8s", "the wrong port",
     lambda p, d: p.batons[0].update(args=[a.replace(":7443", ":7444") for a in p.batons[0]["args"]]),
     "no `--resume-advertise $(POD_IP):7443`"),
    (rule_images, "k8s", "the bare image name",
     lambda p, d: p.batons[0].update(image="baton"), "image 'baton' is not a pinned registry image"),
    (rule_images, "k8s", "latest",
     lambda p, d: p.batons[0].update(image="registry.example.com/baton:latest"), "is not a pinned registry image"),
    (rule_native_sidecar, "k8s", "baton as a regular container",
     lambda p, d: p.spec["containers"].append(p.spec.pop("initContainers").pop(0)),
     "must be a native sidecar"),
    (rule_native_sidecar, "k8s", "no restartPolicy",
     lambda p, d: p.batons[0].pop("restartPolicy"), "must be a native sidecar"),
    (rule_probes, "k8s", "readiness on /healthz",
     lambda p, d: p.batons[0]["readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe.httpGet.path is '/healthz'"),
    (rule_probes, "k8s", "liveness on the tunnel port",
     lambda p, d: p.batons[0]["livenessProbe"]["httpGet"].update(port="tunnel"), "livenessProbe.httpGet.port 'tunnel' is port 7443"),
    (rule_probes, "k8s", "admin on loopback",
     lambda p, d: set_config(p, d, lambda t: t.replace("listen: 0.0.0.0:9901", "listen: 127.0.0.1:9901")),
     "admin.listen 127.0.0.1 is loopback"),
    (rule_probes, "k8s", "readiness failureThreshold 1",
     lambda p, d: p.batons[0]["readinessProbe"].update(failureThreshold=1), "failureThreshold is 1"),
    (rule_probes, "k8s", "readiness slower than the drain delay",
     lambda p, d: p.batons[0]["readinessProbe"].update(periodSeconds=10), "more than drain.delay_ms"),
    (rule_container_ports, "k8s", "admin port not declared",
     lambda p, d: p.batons[0]["ports"].pop(1), "no containerPort 9901 (admin.listen)"),
    (rule_container_ports, "k8s", "a stale port",
     lambda p, d: p.batons[0]["ports"].append({"containerPort": 8443}), "containerPort 8443 is none of"),
    (rule_service_and_selectors, "k8s", "Service to a sidecar's port name",
     lambda p, d: next(x for x in d if x["kind"] == "Service")["spec"]["ports"][0].update(targetPort="tunnel"),
     "is named only on a native sidecar"),
    (rule_service_and_selectors, "k8s", "Service to the wrong port",
     lambda p, d: next(x for x in d if x["kind"] == "Service")["spec"]["ports"][0].update(targetPort=8080),
     "no port targets baton's listener"),
    (rule_service_and_selectors, "k8s", "PDB selecting nothing",
     lambda p, d: next(x for x in d if x["kind"] == "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(app="x"),
     "its selector does not select"),
    (rule_prestop, "k8s", "no preStop",
     lambda p, d: p.apps[0].pop("lifecycle"), "lifecycle.preStop must be httpGet GET /drain"),
    (rule_prestop, "k8s", "preStop to the admin port",
     lambda p, d: p.apps[0]["lifecycle"]["preStop"]["httpGet"].update(port=9901), "is not lifecycle.listen's port 9902"),
    (rule_prestop, "k8s", "wrong token",
     lambda p, d: p.apps[0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"][0].update(value="nope"),
     "sha256 is not lifecycle.token_sha256"),
    (rule_prestop, "k8s", "no lifecycle listener",
     lambda p, d: set_config(p, d, lambda t: re.sub(r"(?m)^lifecycle:\n(  .*\n|\s*#.*\n)*", "", t)),
     "sets no lifecycle.listen"),
    (rule_grace_period, "k8s", "grace period = delay + grace",
     lambda p, d: p.spec.update(terminationGracePeriodSeconds=35), "must exceed drain.delay_ms + drain.grace_ms = 35000 ms"),
    (rule_grace_period, "k8s", "grace period under the lifecycle hook's deadline",
     lambda p, d: set_config(p, d, lambda t: t.replace("delay_ms: 5000", "delay_ms: 1000").replace("grace_ms: 30000", "grace_ms: 41000")),
     "must exceed drain.grace_ms + 5 s = 46000 ms"),
    (rule_handoff_volume, "k8s", "socket on the root filesystem",
     lambda p, d: p.batons[0]["volumeMounts"].pop(2), "is on no volume"),
    (rule_handoff_volume, "k8s", "socket volume not an emptyDir",
     lambda p, d: p.volume("handoff").update(emptyDir=None, hostPath={"path": "/run/baton"}),
     "not an emptyDir"),
    (rule_security, "k8s", "writable root filesystem",
     lambda p, d: p.batons[0]["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem must be true"),
    (rule_security, "k8s", "capabilities kept",
     lambda p, d: p.batons[0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "must drop ALL"),
    (rule_security, "k8s", "root",
     lambda p, d: p.spec["securityContext"].update(runAsNonRoot=False), "must run as non-root"),
    (rule_resources, "k8s", "no memory limit",
     lambda p, d: p.batons[0]["resources"]["limits"].pop("memory"), "must both set memory"),
    (rule_resources, "k8s", "request over limit",
     lambda p, d: p.batons[0]["resources"]["requests"].update(cpu="2"), "cpu request 2 exceeds its limit 1"),
]

HOT = [n for n in KUSTOMIZATIONS if "hot-upgrade" in n]
if HOT:
    BREAKS += [
        (rule_images, HOT[0], "one baton not rewritten by images:",
         lambda p, d: p.batons[0].update(image="baton"), "start from different images"),
        (rule_handoff_volume, HOT[0], "one baton without the socket volume",
         lambda p, d: p.batons[1]["volumeMounts"].__setitem__(
             slice(None), [m for m in p.batons[1]["volumeMounts"] if m["name"] != "handoff"]), "is on no volume"),
        (rule_handoff_volume, HOT[0], "one baton on another emptyDir",
         lambda p, d: (p.spec["volumes"].append({"name": "handoff-b", "emptyDir": {}}),
                       next(m for m in p.batons[1]["volumeMounts"] if m["name"] == "handoff").update(name="handoff-b")),
         "must share the handoff socket"),
        (rule_handoff_volume, HOT[0], "one baton mounts it elsewhere",
         lambda p, d: next(m for m in p.batons[1]["volumeMounts"] if m["name"] == "handoff").update(mountPath="/run/baton-b"),
         "is on no volume"),
    ]


@pytest.mark.parametrize("rule,name,what,change,expected", BREAKS, ids=[b[2] for b in BREAKS])
def test_rule_catches(rendered, rule, name, what, change, expected):
    pods = baton_pods(rendered[name])
    assert pods and not [p for pod in pods for p in rule(pod)], "the unbroken manifests must pass first"
    pod = mutated(rendered, name, change)
    problems = rule(pod)
    assert any(expected in p for p in problems), "%s: expected %r in %s" % (what, expected, problems)


def test_baton_check_catches_a_missing_secret_file(rendered, workdir):
    """The configuration names a file the Secret does not carry."""
    docs = copy.deepcopy(rendered["k8s"].docs)
    secret = next(d for d in docs if d["kind"] == "Secret")
    secret["data"].pop("ticket.key")
    pod = baton_pods(Rendered("k8s", "", docs))[0]
    with pytest.raises(AssertionError, match=r"tls\.ticket_key \(/etc/baton-secret/ticket\.key\) is in no ConfigMap or Secret"):
        materialize(pod, pod.batons[0], Path(tempfile.mkdtemp(prefix="check-", dir=workdir)))
    # and a configuration baton rejects fails `baton check`
    docs = copy.deepcopy(rendered["k8s"].docs)
    pod = baton_pods(Rendered("k8s", "", docs))[0]
    set_config(pod, docs, lambda t: t.replace("heartbeat_ms: 5000", "heartbeat_ms: soon"))
    cfile = materialize(pod, pod.batons[0], Path(tempfile.mkdtemp(prefix="check-", dir=workdir)))
    r = subprocess.run([BATON_BIN, "check", "-c", str(cfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "limits.heartbeat_ms: expected an unsigned integer" in r.stderr + r.stdout, r
