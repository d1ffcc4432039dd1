"""sidecar/Dockerfile stays honest without a container engine on this
machine: its build stage runs the very command CI runs to build, and its
runtime stage installs the Debian package of every shared library the built
binary links (and what the hot-restarter, PID 1, needs)."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BATON_BIN, SANITIZED

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "sidecar" / "Dockerfile"


def stages():
    """{stage name: [(instruction, argument text)]}, line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, arg = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arg.strip(), re.I)
            assert m, "every stage is named: %r" % line
            cur = m.group(2)
            out[cur] = [("FROM", m.group(1))]
            continue
        assert cur, "instruction before FROM: %r" % line
        out[cur].append((instr, " ".join(arg.split())))
    return out


def test_build_stage_runs_what_ci_runs():
    st = stages()
    assert list(st) == ["build", "runtime"], list(st)
    assert st["build"][0] == ("FROM", "debian:12"), st["build"][0]
    runs = [a for i, a in st["build"] if i == "RUN"]
    assert len(runs) == 1, runs
    argv = shlex.split(runs[0])
    assert argv[:2] == ["make", "build"], argv
    # .ci/run -> make test -> (make build first): the same target
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    make_test = re.search(r"^test:(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert make_test and "build" in make_test.group(1).split(), make_test
    # the binary the runtime stage copies is the one that target builds
    build_dir = dict(a.split("=", 1) for a in argv[2:] if "=" in a).get("BUILD", "build")
    copies = [a for i, a in st["runtime"] if i == "COPY"]
    assert "--from=build /src/%s/baton /usr/local/bin/baton" % build_dir in copies, copies


def apt_packages(stage):
    pkgs = set()
    for instr, arg in stage:
        if instr != "RUN":
            continue
        for cmd in arg.split("&&"):
            argv = shlex.split(cmd)
            if argv[:2] == ["apt-get", "install"]:
                pkgs |= {a for a in argv[2:] if not a.startswith("-")}
    return pkgs


@pytest.mark.skipif(SANITIZED, reason="sanitizer builds link their runtimes; the image is built without them")
def test_runtime_stage_has_every_shared_library_package():
    out = subprocess.run(["ldd", BATON_BIN], capture_output=True, text=True, check=True).stdout
    libs = [m.group(1) for m in re.finditer(r"=>\s+(/\S+)", out)]
    assert libs, out
    needed = set()
    for lib in libs:
        real = os.path.realpath(lib)
        r = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
        if r.returncode != 0:  # /lib vs /usr/lib (merged /usr)
            r = subprocess.run(["dpkg", "-S", real.replace("/usr/lib/", "/lib/", 1)], capture_output=True, text=True)
        assert r.returncode == 0, "no Debian package owns %s" % real
        needed.add(r.stdout.split(":")[0])
    base = {"libc6", "libgcc-s1"}  # in debian:12-slim itself
    have = apt_packages(stages()["runtime"])
    missing = needed - base - have
    assert not missing, "the runtime stage lacks %s (ldd of %s)" % (sorted(missing), BATON_BIN)


def test_runtime_stage_runs_the_hot_restarter_as_non_root():
    st = stages()["runtime"]
    instr = dict((i, a) for i, a in st)
    restarter = ROOT / "scripts" / "hot-restart" / "hot-restarter"
    assert "scripts/hot-restart/hot-restarter /usr/local/bin/hot-restarter" in [a for i, a in st if i == "COPY"]
    assert restarter.read_text().startswith("#!/usr/bin/env python3\n")
    assert "python3" in apt_packages(st), "the hot-restarter needs python3"
    assert instr["ENTRYPOINT"] == '["/usr/local/bin/hot-restarter"]', instr["ENTRYPOINT"]
    user = instr["USER"].split(":")
    assert user[0].isdigit() and int(user[0]) != 0, "USER must be a numeric non-root uid for runAsNonRoot"
    # the example Deployment runs as that user and passes the same arguments
    dep = yaml.safe_load((ROOT / "k8s" / "base" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user[0])
    baton = [c for c in pod.get("initContainers", []) if c["name"] == "baton"]
    assert baton and baton[0]["args"][0] == "--", "args go to the hot-restarter: -- baton serve ..."
    # The image's default command, then what only Kubernetes knows: the pod
    # IP for session resume (--resume-advertise $(POD_IP):7443).
    cmd = json.loads(instr["CMD"])
    assert baton[0]["args"][:len(cmd)] == cmd, (instr["CMD"], baton[0]["args"])
    assert baton[0]["args"][len(cmd):] == ["--resume-advertise", "$(POD_IP):7443"], baton[0]["args"]


def test_dockerignore_keeps_build_outputs_and_secrets_out():
    ign = (ROOT / ".dockerignore").read_text().split()
    for p in ("build*/", "k8s/base/secrets/", ".git/"):
        assert p in ign, p
