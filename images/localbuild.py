"""Build the job image where no registry can be reached (CI): a minimal Debian with
Python made by debootstrap becomes the base image, and images/Dockerfile is built on it
through the same ``BASE_IMAGE`` argument users set to a CUDA image.

podman runs with storage of its own under ``.containers/`` (overlay where the kernel
mounts it, else vfs; runc and cgroupfs: what works without a container daemon or
systemd), pointed at by ``CONTAINERS_CONF`` and
``CONTAINERS_STORAGE_CONF``, so nothing in /etc changes and ``podman`` commands given
those two variables (``env()``) see the image. What pip needs from this machine (its CA
bundle, wheel folder, mirror) is handed to the build as read-only mounts and pip's own
build arguments; the Dockerfile knows nothing of this machine.

    python -m images.localbuild          # builds, prints build time and image size, writes JSON
    python -m images.localbuild --cuda   # the CUDA image (`make images-cuda-local`), below

``--cuda`` builds the image GPU nodes run, as far as a machine without a registry and without
a GPU can: torch's CUDA build from pip on a Debian base with a compiler and Python's headers
(the part of the -devel image the build uses), this machine's CUDA toolkit mounted read-only
for nvcc, so DeepSpeed's fused Adam and CPU Adam are compiled into it; then images/check_ops.py
runs inside it (no toolkit, no GPU) and the CPU ops' machine code is searched for AVX-512.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("KUBERLHF_CONTAINERS", ROOT / ".containers"))
BASE = "localhost/kuberlhf-base:bookworm"
IMAGE = "localhost/kuberlhf:ci"
# What the -devel images give a build that the minimal base lacks: a C++ compiler and Python's
# headers for DeepSpeed's ops.
DEVEL_BASE = "localhost/kuberlhf-base:bookworm-devel"
DEVEL_PACKAGES = ("python3-dev", "g++")
CUDA_IMAGE = "localhost/kuberlhf:cuda"
CUDA_TORCH = "torch==2.14.1"  # pip's CUDA 13.0 build for Python 3.11
TOOLS = ("podman", "debootstrap")
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# pip's settings that name things on this machine, as build arguments and mounts.
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "cert")
BUILD_MOUNTS = "/run/kuberlhf-build"
CONTEXT_LABEL = "io.kuberlhf.context"


def missing(cuda: bool = False) -> list[str]:
    """What this machine lacks for a local build (root is needed for debootstrap; the CUDA
    image's check reads machine code with objdump)."""
    tools = TOOLS + (("objdump",) if cuda else ())
    lacking = [tool for tool in tools if shutil.which(tool) is None]
    return lacking + (["root"] if os.geteuid() != 0 else [])


def storage_driver() -> str:
    """overlay where the kernel mounts it here (containers start at once), else vfs, which
    works everywhere but copies the whole image for every layer and container."""
    if chosen := os.environ.get("KUBERLHF_STORAGE_DRIVER"):
        return chosen
    STATE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=STATE) as folder:
        parts = [Path(folder) / part for part in ("lower", "upper", "work", "merged")]
        for part in parts:
            part.mkdir()
        lower, upper, work, merged = parts
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        mounted = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            return "vfs"
        subprocess.run(["umount", str(merged)], check=False)
        return "overlay"


@cache
def env() -> dict[str, str]:
    """The variables that point podman at the private storage and its settings (written
    once per process)."""
    STATE.mkdir(parents=True, exist_ok=True)
    containers, storage = STATE / "containers.conf", STATE / "storage.conf"
    # The sandbox refuses the rlimits podman sets by default; crun fails on hybrid
    # cgroups, runc does not; without systemd, events go to a file.
    containers.write_text(
        "[containers]\ndefault_ulimits = []\n\n"
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    if not storage.exists():  # the driver of existing storage cannot change
        storage.write_text(
            f'[storage]\ndriver = "{storage_driver()}"\ngraphroot = "{STATE / "storage"}"\n'
            f'runroot = "{STATE / "run"}"\n'
        )
    return {"CONTAINERS_CONF": str(containers), "CONTAINERS_STORAGE_CONF": str(storage)}


def podman(
    *args: str, capture: bool = False, check: bool = True, **run
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        env={**os.environ, **env()},
        check=check,
        text=True,
        capture_output=capture,
        **run,
    )


def exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def base_image(image: str = BASE) -> float:
    """Make the Debian base (bookworm: Python 3.11; with a compiler for DEVEL_BASE) unless it
    is there; seconds taken."""
    if exists(image):
        return 0.0
    packages = ["python3", "python3-venv", "ca-certificates"]
    if image == DEVEL_BASE:
        packages += DEVEL_PACKAGES
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=STATE) as folder:
        rootfs = Path(folder) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                "bookworm",
                str(rootfs),
                MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Debian's own Python refuses pip installs (PEP 668): a venv on the PATH makes the
        # base behave as python:3.11-slim does, `python` and `pip` included.
        subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/python"], check=True)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman(
            "import",
            "--change",
            "ENV PATH=/opt/python/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["python"]',
            "-",
            image,
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        tar.wait()
    return time.perf_counter() - start


def _pip_variable(setting: str) -> str:
    return "PIP_" + setting.upper().replace("-", "_")


def pip_passthrough() -> list[str]:
    """Build arguments and read-only mounts carrying this machine's pip settings (from
    PIP_* variables, else pip's config) into the build. The mounts go under /run, which is
    a tmpfs during build steps, so not even their empty mount points stay in the image."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found: dict[str, str] = {}  # PIP_* variable -> value
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        setting = key.rsplit(".", 1)[-1]
        if setting in PIP_SETTINGS:
            found.setdefault(_pip_variable(setting), value.strip().strip("'\""))
    for variable in map(_pip_variable, PIP_SETTINGS):
        if variable in os.environ:
            found[variable] = os.environ[variable]
    args, mounts = [], {}
    for variable, value in found.items():
        items = []
        for item in value.split():
            url = item.startswith("file:")
            path = urlparse(item).path if url else item
            if not (path.startswith("/") and Path(path).exists()):
                items.append(item)
                continue
            # An index's pages link to the files beside it: mount its parent.
            root = str(Path(path).parent) if url and Path(path).name == "simple" else path
            mounts[root] = f"{BUILD_MOUNTS}{root}"
            inside = f"{BUILD_MOUNTS}{path}"
            items.append(f"file://{inside}" if url else inside)
        args += ["--build-arg", f"{variable}={' '.join(items)}"]
    for host, inside in sorted(mounts.items()):
        args += ["--volume", f"{host}:{inside}:ro"]
    return args


@dataclass
class Built:
    image: str
    base_s: float
    build_s: float
    size_bytes: int
    base_size_bytes: int
    fresh: bool = True

    def figures(self) -> dict:
        return {
            "image": self.image,
            "base_image_s": round(self.base_s, 1),
            "build_s": round(self.build_s, 1),
            "image_size_gb": round(self.size_bytes / 1e9, 2),
            "base_size_gb": round(self.base_size_bytes / 1e9, 2),
        }


def size(image: str) -> int:
    out = podman("image", "inspect", "--format", "{{.Size}}", image, capture=True).stdout
    return int(out.strip())


def context_digest(torch_spec: str, base: str = BASE, toolkit: Path | None = None) -> str:
    """What the image is built from: the Dockerfile, what .dockerignore lets into the build
    context, the base, torch and the CUDA toolkit (its folder and version)."""
    digest = hashlib.sha256(f"{base} {torch_spec} {toolkit}".encode())
    if toolkit is not None and (toolkit / "version.json").is_file():
        digest.update((toolkit / "version.json").read_bytes())
    allowed = [
        line[1:].strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    paths = [ROOT / "images" / "Dockerfile"]
    for name in allowed:
        top = ROOT / name
        paths += (
            sorted(p for p in top.rglob("*") if "__pycache__" not in p.parts)
            if top.is_dir()
            else [top]
        )
    for path in paths:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def label(image: str, key: str) -> str | None:
    """The image's label, None where there is no such image."""
    template = '{{index .Labels "' + key + '"}}'
    inspected = podman("image", "inspect", "--format", template, image, capture=True, check=False)
    return inspected.stdout.strip() if inspected.returncode == 0 else None


def build(
    image: str = IMAGE, torch_spec: str = "torch==2.13.0", cuda_toolkit: Path | None = None
) -> Built:
    """The base if needed, then the Dockerfile, unless the image was built from exactly this
    context (a label records its digest); podman's layer cache keeps the dependency layer
    when only code changed. With ``cuda_toolkit``, the devel base and that toolkit mounted
    for the ops' build."""
    base = BASE if cuda_toolkit is None else DEVEL_BASE
    digest = context_digest(torch_spec, base, cuda_toolkit)
    if label(image, CONTEXT_LABEL) == digest:
        return Built(image, 0.0, 0.0, size(image), size(base), fresh=False)
    base_s = base_image(base)
    toolkit = []
    if cuda_toolkit is not None:
        inside = f"{BUILD_MOUNTS}/cuda"
        toolkit = [
            "--volume",
            f"{cuda_toolkit}:{inside}:ro",
            "--build-arg",
            f"CUDA_TOOLKIT={inside}",
        ]
    start = time.perf_counter()
    podman(
        "build",
        "--isolation",
        "chroot",
        "--file",
        str(ROOT / "images" / "Dockerfile"),
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"TORCH_SPEC={torch_spec}",
        # the container tests run no tracking server: the image without MLflow's and W&B's
        # clients builds a minute faster (the CUDA image, as released, has them)
        *(["--build-arg", "TRACKING="] if cuda_toolkit is None else []),
        *toolkit,
        *pip_passthrough(),
        "--label",
        f"{CONTEXT_LABEL}={digest}",
        "--tag",
        image,
        str(ROOT),
    )
    return Built(image, base_s, time.perf_counter() - start, size(image), size(base))


def cuda_toolkit() -> Path | None:
    """This machine's CUDA toolkit: CUDA_HOME, else /usr/local/cuda or the newest cuda-*."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    candidates += sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)
    for candidate in filter(None, candidates):
        if (Path(candidate) / "bin" / "nvcc").is_file():
            return Path(candidate).resolve()
    return None


# Registers only AVX-512 code names: zmm, the mask registers k1-k7, and xmm/ymm 16-31, which
# 256-bit AVX-512 code uses without zmm (images/build-ops.sh checks the same in every build).
AVX512_CODE = re.compile(r"%zmm|%k[1-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])")


def check_cuda_image(image: str) -> dict:
    """images/check_ops.py inside the image (DeepSpeed told to use CUDA, as on a GPU node),
    then CPU Adam's machine code searched for AVX-512 instructions, which a node without
    AVX-512 cannot run."""
    script = "/run/check_ops.py"
    ran = podman(
        "run", "--rm", "--env", "DS_ACCELERATOR=cuda",
        "--volume", f"{ROOT / 'images' / 'check_ops.py'}:{script}:ro",
        image, "python", script,
        capture=True, check=False,
    )  # fmt: skip
    if ran.returncode != 0:
        raise SystemExit(f"local image build: the check in {image} failed:\n{ran.stderr[-3000:]}")
    figures = json.loads(ran.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as folder:
        fused, cpu = Path(folder) / "fused_adam.so", Path(folder) / "cpu_adam.so"
        for op, library in (("fused_adam", fused), ("cpu_adam", cpu)):
            with library.open("wb") as out:  # written by podman itself: no text decoding
                podman("run", "--rm", image, "cat", figures[op], stdout=out)
        code = subprocess.run(
            ["objdump", "-d", str(cpu)], capture_output=True, text=True, check=True
        ).stdout
        # the GPU architectures whose code the fat binary carries (its ELF names them)
        archs = sorted(set(re.findall(rb"sm_[0-9]+", fused.read_bytes())))
    figures["cpu_adam_avx512_instructions"] = sum(
        bool(AVX512_CODE.search(line)) for line in code.splitlines()
    )
    figures["fused_adam_gpu_archs"] = [arch.decode() for arch in archs]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument(
        "--if-possible",
        action="store_true",
        help="say what is missing and exit 0 where podman or root is lacking",
    )
    parser.add_argument(
        "--cuda",
        action="store_true",
        help=f"the CUDA image ({CUDA_TORCH}, DeepSpeed's ops compiled with this machine's "
        "CUDA toolkit), then checked",
    )
    args = parser.parse_args(argv)
    if lacking := missing(cuda=args.cuda):
        print(
            f"local image build: not possible here, missing {', '.join(lacking)}"
            " (the container tests skip)"
        )
        return 0 if args.if_possible else 1
    toolkit = None
    if args.cuda:
        toolkit = cuda_toolkit()
        if toolkit is None:
            print("local image build: --cuda needs a CUDA toolkit (CUDA_HOME or /usr/local/cuda)")
            return 1
        image = CUDA_IMAGE if args.image == IMAGE else args.image
        built = build(image, CUDA_TORCH, toolkit)
    else:
        built = build(args.image)
    figures = built.figures()
    if not built.fresh:
        print(f"local image build: {built.image} is up to date ({figures['image_size_gb']} GB)")
    else:
        print(
            f"local image build: {built.image} built in {figures['build_s']} s "
            f"(base image {figures['base_image_s']} s), {figures['image_size_gb']} GB "
            f"(base {figures['base_size_gb']} GB)"
        )
    if toolkit is not None:
        figures |= {"cuda_toolkit": str(toolkit), **check_cuda_image(built.image)}
        print(
            "local image build: DeepSpeed's fused Adam (for "
            f"{', '.join(figures['fused_adam_gpu_archs'])}) and CPU Adam are built in for CUDA "
            f"(torch {figures['torch']}, CUDA {figures['torch_cuda']}); CPU Adam equals "
            f"torch's AdamW to {figures['cpu_adam_vs_torch_adamw_max_abs_diff']:.1e} and has "
            f"{figures['cpu_adam_avx512_instructions']} AVX-512 instructions"
        )
        if figures["cpu_adam_avx512_instructions"]:
            return 1
    results = ROOT / "bench" / "results"
    path = results / ("image_build_cuda.json" if toolkit is not None else "image_build.json")
    if not built.fresh:
        if toolkit is None or not path.is_file():
            return 0
        # the image's check is new; its build figures stay the last fresh build's
        last = json.loads(path.read_text())
        figures |= {k: last[k] for k in ("base_image_s", "build_s") if k in last}
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
