"""``make image-test``: build the CPU image here and run it the way go-livepeer starts a runner.

``make image-test-gpu`` (``--gpu``): build the GPU image (docker/Dockerfile: vLLM's CUDA build from
PyPI on the same Debian base) and run it on this machine, which has no GPU: /health must reach
ERROR with a reason that names the missing GPU, a request must be refused with that reason, and
SIGTERM must end the container cleanly, as for the CPU image.

Uses docker where a daemon answers, else buildah (vfs storage, chroot isolation). The base
image is BASE_IMAGE; where it is missing it is made with debootstrap (Debian bookworm) under
IMAGE_CACHE, outside the checkout, and reused. pip's sources at build time (this machine's
pip config, local wheel folders and indexes, CA bundle) are mounted for the build only.

The model store (MODEL_DIR) is mounted read-write at /models; the image's user is uid 1000,
so the store is handed to uid 1000 (chown) when that user cannot write it.
Prints one last line ``image-test: PASS ...`` with the figures, or exits 1 saying what failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = "--gpu" in sys.argv[1:]
DOCKERFILE = "docker/Dockerfile" if GPU else "docker/Dockerfile.cpu"
IMAGE = os.environ.get("IMAGE", "localhost/livepeer-llm-runner:latest" if GPU else "localhost/livepeer-llm-runner:cpu")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "localhost/debian-bookworm:debootstrap")
CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/tmp/livepeer-llm-runner-image"))
STORAGE = os.environ.get("IMAGE_STORAGE", "")  # buildah's --root; empty: buildah's default store
MODEL_ID = os.environ.get("MODEL_ID", "HuggingFaceTB/SmolLM2-135M-Instruct")
MODEL_DIR = Path(os.environ.get("MODEL_DIR", ROOT / "models")).resolve()
PYTHON = os.environ.get("PY", sys.executable)
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# A file to hold flock(2) on while the container runs (its vLLM import is CPU heavy), on a shared machine.
RUN_LOCK = os.environ.get("IMAGE_TEST_LOCK", "")
READY_TIMEOUT_S = float(os.environ.get("IMAGE_TEST_READY_TIMEOUT", "900"))
STOP_GRACE_S = 8.0
QUESTION = "What is the capital of France?"
# What the GPU image's runner must say, without a GPU, in its ERROR reason (pipelines/llm/host.py).
NO_GPU_REASON = "no NVIDIA GPU"


class Failed(Exception):
    pass


def say(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, text=True, **kwargs)


def docker_answers() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def buildah(*args: str) -> list[str]:
    return ["buildah", "--storage-driver", "vfs", *(["--root", STORAGE] if STORAGE else []), *args]


def image_exists(engine: str, image: str) -> bool:
    command = ["docker", "image", "inspect", image] if engine == "docker" else buildah("inspect", "--type", "image", image)
    return subprocess.run(command, capture_output=True).returncode == 0


def make_base(engine: str) -> None:
    if image_exists(engine, BASE_IMAGE):
        say(f"base {BASE_IMAGE} present")
        return
    if not shutil.which("debootstrap"):
        raise Failed("no base image and no debootstrap: apt-get install debootstrap (or pass BASE_IMAGE=debian:bookworm-slim)")
    rootfs = CACHE / "bookworm-rootfs"
    if not (rootfs / "etc/debian_version").exists():
        say(f"debootstrap bookworm into {rootfs} (a few minutes)")
        shutil.rmtree(rootfs, ignore_errors=True)
        sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
    say(f"importing {rootfs} as {BASE_IMAGE}")
    if engine == "docker":
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh("docker", "import", "-", BASE_IMAGE, stdin=tar.stdout)
        tar.wait()
        return
    container = sh(*buildah("from", "scratch"), capture_output=True).stdout.strip()
    try:
        mount = sh(*buildah("mount", container), capture_output=True).stdout.strip()
        sh("cp", "-a", f"{rootfs}/.", mount)
        sh(*buildah("config", "--cmd", "/bin/bash", container))
        sh(*buildah("commit", container, BASE_IMAGE), capture_output=True)
    finally:
        subprocess.run(buildah("rm", container), capture_output=True)


def pip_build_config() -> tuple[Path, list[tuple[str, str]]]:
    """This machine's pip config as a pip.conf for the build, and the local paths it needs mounted."""
    listing = sh(PYTHON, "-m", "pip", "config", "list", capture_output=True).stdout.splitlines()
    settings: dict[str, str] = {}
    for line in listing:
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip("'\"")
    mounts: list[tuple[str, str]] = []
    lines = ["[global]"]
    for key in ("find-links", "index-url", "extra-index-url", "constraint", "default-timeout"):
        if key not in settings:
            continue
        items = settings[key].split()
        if GPU and key == "find-links":
            # A local folder with the CPU torch (make install's) would win over the CUDA one of the
            # same version (2.13.0+cpu sorts above 2.13.0): the GPU build does without such folders.
            items = [item for item in items if not list(Path(item.removeprefix("file://")).glob("torch-*+cpu-*.whl"))]
            if not items:
                continue
        lines.append(f"{key} = {' '.join(items)}")
        for item in items:
            path = item.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                # An index's pages may point at files beside "simple": mount its parent.
                source = str(Path(path).parent) if path.rstrip("/").endswith("/simple") else path
                mounts.append((source, source))
    if "cert" in settings and Path(settings["cert"]).exists():
        lines.append("cert = /run/build-pip/ca-certificates.crt")
        mounts.append((settings["cert"], "/run/build-pip/ca-certificates.crt"))
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / ("build-pip-gpu.conf" if GPU else "build-pip.conf")
    conf.write_text("\n".join(lines) + "\n")
    mounts.append((str(conf), "/run/build-pip/pip.conf"))
    return conf, list(dict.fromkeys(mounts))


def build(engine: str) -> float:
    _, mounts = pip_build_config()
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "PIP_CONFIG_FILE=/run/build-pip/pip.conf"]
    say(f"building {IMAGE} from {DOCKERFILE} on {BASE_IMAGE} with {engine}")
    start = time.monotonic()
    if engine == "docker":
        # docker build has no build-time volumes: only indexes reachable over the network work here.
        sh("docker", "build", "--network", "host", "-f", DOCKERFILE,
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE, ".", cwd=ROOT)
    else:
        volumes = [arg for source, target in mounts for arg in ("--volume", f"{source}:{target}:ro")]
        # vfs has no copy-on-write: with --layers, each step after the ~9 GB dependency layer of the GPU
        # image gets a working container that is a full copy, kept until the build ends (10 of them
        # would not fit the disk). The GPU image is built in one working container and committed once.
        layers = [] if GPU else ["--layers"]
        sh(*buildah("bud", "--format", "docker", "--isolation", "chroot", *layers, "-f", DOCKERFILE, *args, *volumes,
                    "-t", IMAGE, "."), cwd=ROOT)
    return time.monotonic() - start


def image_config(engine: str) -> tuple[list[str], list[str]]:
    """(entrypoint, healthcheck command) of the built image."""
    if engine == "docker":
        [info] = json.loads(sh("docker", "image", "inspect", IMAGE, capture_output=True).stdout)
        return info["Config"]["Entrypoint"], info["Config"]["Healthcheck"]["Test"]
    info = json.loads(sh(*buildah("inspect", "--type", "image", IMAGE), capture_output=True).stdout)
    return info["OCIv1"]["config"]["Entrypoint"], info["Docker"]["config"]["Healthcheck"]["Test"]


def image_size_text(engine: str) -> str:
    if engine == "docker":
        return sh("docker", "image", "ls", "--format", "{{.Size}}", IMAGE, capture_output=True).stdout.strip()
    return sh(*buildah("images", "--noheading", "--format", "{{.Size}}", IMAGE), capture_output=True).stdout.split("\n")[0].strip()


def free_port(preferred: int = 8000) -> int:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_writable_by_runner() -> None:
    """The image's user (uid 1000) owns what it writes in the store; hand the store over if it cannot."""
    if MODEL_DIR.stat().st_uid != 1000:
        say(f"{MODEL_DIR} is owned by uid {MODEL_DIR.stat().st_uid}: chown -R 1000:1000 (the image's user)")
        sh("chown", "-R", "1000:1000", str(MODEL_DIR))


@contextlib.contextmanager
def run_lock():
    if not RUN_LOCK:
        yield
        return
    with open(RUN_LOCK, "a") as lock:
        say(f"waiting for {RUN_LOCK} (IMAGE_TEST_LOCK)")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cuda_build(container: str) -> str:
    """vLLM, torch and the platform vLLM picks, as the image's Python imports them (no GPU here: not "cuda")."""
    script = ("import torch, vllm; from vllm.platforms import current_platform as p; "
              "print(f'vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              "vLLM platform {p.device_type!r}')")
    result = subprocess.run(buildah("run", "--isolation", "chroot", container, "--", "python", "-c", script),
                            capture_output=True, text=True)
    if result.returncode != 0 or "CUDA None" in result.stdout:
        raise Failed(f"the image's vLLM is no CUDA build, or does not import: {result.stdout}{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


def http(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(parent_of(int(entry.name)), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def in_image(pid: int) -> bool:
    """Whether the process runs a program of the image: chrooted, its executable inside that root."""
    try:
        root, exe = os.readlink(f"/proc/{pid}/root"), os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return root != "/" and exe.startswith(root.rstrip("/") + "/")


def entrypoint_pid(launcher: int) -> int | None:
    """The container's entrypoint process: what docker signals as PID 1.

    `buildah run` does not forward signals, and between it and the entrypoint sit its own
    chroot-runtime and chroot-exec (programs in memory, the second already chrooted): the
    entrypoint is the one process of the image whose parent is not of the image.
    """
    found = [pid for pid in descendants(launcher) if in_image(pid) and not in_image(parent_of(pid))]
    return found[0] if len(found) == 1 else None


def chrooted_into(root: str) -> list[int]:
    """Processes running chrooted into ``root``: with no PID namespace, what outlived the entrypoint."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == root:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


# Paths `buildah run` itself writes into a container's root at each run (its resolv.conf, hosts, ...).
RUN_ARTIFACTS = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run/")
# Scratch space: vLLM's ZeroMQ sockets between the runner and its engine core live here (a
# container with --read-only needs --tmpfs /tmp); reported, not a failure.
SCRATCH = "/tmp/"


def root_files(container: str) -> dict[str, tuple[int, float]]:
    """(size, mtime) of every file in the container's root, not under /models, /proc, /sys or /dev."""
    root = Path(sh(*buildah("mount", container), capture_output=True).stdout.strip())
    try:
        found = {}
        for directory, dirs, files in os.walk(root):
            relative = "/" + str(Path(directory).relative_to(root)).removeprefix(".")
            dirs[:] = [d for d in dirs if f"{relative.rstrip('/')}/{d}" not in ("/proc", "/sys", "/dev", "/models")]
            for name in files:
                try:
                    stat = Path(directory, name).lstat()
                except OSError:
                    continue
                found[f"{relative.rstrip('/')}/{name}"] = (stat.st_size, stat.st_mtime)
        return found
    finally:
        subprocess.run(buildah("umount", container), capture_output=True)


def written_outside_store(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> list[str]:
    """Files the run created, changed or removed in the container's root, less what `buildah run` writes itself."""
    changed = [path for path in before.keys() | after.keys() if before.get(path) != after.get(path)]
    return sorted(path for path in changed if not path.startswith(RUN_ARTIFACTS))


def run_and_probe(engine: str, entrypoint: list[str], healthcheck: list[str]) -> dict[str, float]:
    port = free_port()
    env = {"PIPELINE": "llm", "MODEL_ID": MODEL_ID, "PORT": str(port)}
    store_mode = "ro" if GPU else "rw"  # the GPU image without a GPU starts no engine: nothing to write
    log_path = CACHE / "runner.log"
    say(f"starting the image's entrypoint {entrypoint} on port {port}, store {MODEL_DIR} at /models (log {log_path})")
    container = None
    if engine == "docker":
        command = ["docker", "run", "--rm", "--network", "host", "-v", f"{MODEL_DIR}:/models:{store_mode}",
                   *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], IMAGE]
    else:
        container = sh(*buildah("from", IMAGE), capture_output=True).stdout.strip()
        # buildah run gives an image's VOLUME a fresh empty folder even where --volume names the
        # same path; dropped from this working container only, the store's bind mount shows through.
        sh(*buildah("config", "--volume", "/models-", container))
        command = buildah("run", "--isolation", "chroot", "--network", "host", "--volume", f"{MODEL_DIR}:/models:{store_mode}",
                          *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], container, "--", *entrypoint)
    if GPU and container:
        say(f"the image imports {cuda_build(container)}")
    before = root_files(container) if container else {}
    started = time.monotonic()
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    figures: dict[str, float] = {}
    try:
        seen = []
        target = "ERROR" if GPU else "IDLE"  # without a GPU, the GPU image's start fails: ERROR, not a crash
        while time.monotonic() - started < READY_TIMEOUT_S:
            if launcher.poll() is not None:
                raise Failed(f"the runner exited with {launcher.returncode} before {target}; see {log_path}")
            try:
                with http(port, "GET", "/health", timeout=5) as response:
                    status = json.load(response)["status"]
            except urllib.error.HTTPError as exc:  # 503 while LOADING carries the status too
                status = json.load(exc).get("status")
            except OSError:
                status = None
            if status and (not seen or seen[-1] != status):
                seen.append(status)
                say(f"/health {status} after {time.monotonic() - started:.0f} s")
            if status == target:
                break
            if status in ("ERROR", "IDLE"):
                raise Failed(f"/health says {status}, not {target}; see {log_path}")
            time.sleep(1)
        else:
            raise Failed(f"/health did not reach {target} in {READY_TIMEOUT_S:.0f} s (saw {seen}); see {log_path}")
        figures["ready_s"] = time.monotonic() - started
        if GPU:
            figures["reason"] = refused_for_no_gpu(port, log_path)
        else:
            probe_answers(port, figures, started)

        if container:  # the image's HEALTHCHECK, run inside the image beside the runner: unhealthy on ERROR
            probe = [part for part in healthcheck if part not in ("CMD", "CMD-SHELL")]
            result = subprocess.run(buildah("run", "--isolation", "chroot", "--network", "host", "--env", f"PORT={port}",
                                            container, "--", *probe), capture_output=True, text=True)
            if (result.returncode == 0) == GPU:
                raise Failed(f"HEALTHCHECK {probe} exited {result.returncode} on /health {target}: "
                             f"{result.stdout}{result.stderr}")
            say(f"HEALTHCHECK {probe} {'fails (unhealthy)' if GPU else 'passes'} inside the image"
                + (f": {result.stderr.strip()}" if GPU else ""))
        stop_and_check(engine, launcher, container, before, figures, log_path)
        return figures
    finally:
        if launcher.poll() is None:
            for pid in [launcher.pid, *descendants(launcher.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            launcher.wait()
        if container:
            subprocess.run(buildah("rm", container), capture_output=True)


def refused_for_no_gpu(port: int, log_path: Path) -> str:
    """The GPU image without a GPU: a request is refused (503) with the reason, which names the missing GPU."""
    try:
        with http(port, "POST", "/llm", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}):
            raise Failed("/llm answered without a GPU")
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.load(exc)
    reason = body.get("detail", {}).get("msg", "")
    if status != 503 or NO_GPU_REASON not in reason:
        raise Failed(f"/llm gave {status} {body}, not 503 naming the missing GPU ({NO_GPU_REASON!r})")
    say(f"/llm refused: {status} {reason!r}")
    logged = [line for line in log_path.read_text().splitlines() if "pipeline.load.failed" in line]
    if not any(NO_GPU_REASON in line for line in logged):
        raise Failed(f"no pipeline.load.failed line naming the missing GPU in {log_path}")
    if "Traceback" in log_path.read_text().split("pipeline.load.failed")[0]:
        raise Failed(f"a traceback before the start failed: see {log_path}")
    say(f"log: {logged[0].strip()[:300]}")
    return reason


def probe_answers(port: int, figures: dict, started: float) -> None:
    question = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0}
    with http(port, "POST", "/llm", question) as response:
        answer = json.load(response)
    figures["first_answer_s"] = time.monotonic() - started
    text = answer["choices"][0]["message"]["content"]
    if "Paris" not in text:
        raise Failed(f"/llm answered {text!r}, not Paris")
    say(f"/llm plain: {text!r}")
    streamed, done = "", False
    with http(port, "POST", "/llm", {**question, "stream": True}) as response:
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                streamed += json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
    if not done or "Paris" not in streamed:
        raise Failed(f"/llm stream gave {streamed!r} (ended with [DONE]: {done})")
    say(f"/llm streamed: {streamed!r}")
    for path in ("/version", "/hardware/info"):
        with http(port, "GET", path) as response:
            say(f"{path}: {json.dumps(json.load(response))[:200]}")



def stop_and_check(engine: str, launcher: subprocess.Popen, container: str | None, before: dict,
                   figures: dict, log_path: Path) -> None:
    """SIGTERM to the entrypoint: exit 0 within STOP_GRACE_S, nothing of the image left, nothing written outside."""
    pid = entrypoint_pid(launcher.pid) if engine != "docker" else launcher.pid
    if pid is None:
        raise Failed(f"cannot tell the entrypoint's process among {descendants(launcher.pid)}")
    root = os.readlink(f"/proc/{pid}/root") if engine != "docker" else None
    stop = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        launcher.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        raise Failed(f"the runner did not exit within {STOP_GRACE_S:.0f} s of SIGTERM") from None
    figures["stop_s"] = time.monotonic() - stop
    say(f"SIGTERM: exited {launcher.returncode} in {figures['stop_s']:.1f} s")
    if launcher.returncode != 0:
        raise Failed(f"the runner exited {launcher.returncode} after SIGTERM, not 0; see {log_path}")
    if root:
        time.sleep(0.5)
        left = chrooted_into(root)
        if left:
            for orphan in left:
                os.kill(orphan, signal.SIGKILL)
            raise Failed(f"processes outlived the runner (killed now): {[command_line(p) for p in left]}")
        say("no process of the image outlived the runner")
    foreign = [] if GPU else [str(p) for p in MODEL_DIR.rglob("*") if p.stat().st_uid not in (1000,)]
    if foreign:
        raise Failed(f"files in the store not owned by the image's user: {foreign[:5]}")
    if container:
        outside = written_outside_store(before, root_files(container))
        scratch = [path for path in outside if path.startswith(SCRATCH)]
        outside = [path for path in outside if not path.startswith(SCRATCH)]
        if outside:
            raise Failed(f"the runner wrote outside /models and {SCRATCH}: {outside[:20]}")
        say(f"nothing written in the container's root outside /models and {SCRATCH} ({len(scratch)} there: {scratch[:4]})")


def main() -> int:
    engine = "docker" if docker_answers() else "buildah"
    if engine == "buildah" and not shutil.which("buildah"):
        say("FAIL: no docker daemon and no buildah: apt-get install buildah debootstrap")
        return 1
    try:
        if not (MODEL_DIR / f"models--{MODEL_ID.replace('/', '--')}").is_dir():
            raise Failed(f"{MODEL_ID} is not in {MODEL_DIR}: run make models")
        make_base(engine)
        build_s = build(engine)
        entrypoint, healthcheck = image_config(engine)
        if not GPU:  # the GPU image's run has the store read-only
            store_writable_by_runner()
        with run_lock():
            figures = run_and_probe(engine, entrypoint, healthcheck)
    except (Failed, subprocess.CalledProcessError) as exc:
        say(f"FAIL: {exc}")
        return 1
    if GPU:
        say(f"PASS image={IMAGE} size={image_size_text(engine)} build={build_s:.0f}s "
            f"error={figures['ready_s']:.0f}s sigterm_exit={figures['stop_s']:.1f}s engine={engine} base={BASE_IMAGE}")
    else:
        say(f"PASS image={IMAGE} size={image_size_text(engine)} build={build_s:.0f}s "
            f"ready={figures['ready_s']:.0f}s first_answer={figures['first_answer_s']:.0f}s "
            f"sigterm_exit={figures['stop_s']:.1f}s engine={engine} base={BASE_IMAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
