"""How pyiqa builds a metric safely: ``weights_only`` loads, torch's global flags kept, downloads
explained. Used by :class:`~acpo_lightning.quality.pyiqa_head.PyiqaQualityHead` only."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch


class PyiqaWeightsError(RuntimeError):
    """A pyiqa metric needs a weight file that is not cached and could not be downloaded."""


#: Held while ``torch.load`` is wrapped, so that two threads building heads cannot leave the
#: wrapper installed by restoring each other's saved function out of order.
_LOAD_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make pyiqa's own ``torch.load`` calls ``weights_only=True`` while it builds a metric.

    Why: pyiqa calls ``torch.load(path, weights_only=False)`` on some weight files (BRISQUE's
    ``(sv_coef, sv)`` pair, several architectures' checkpoints); unpickling such a file runs any
    code a crafted ``pretrained_model_path`` or cached download carries. ``weights_only=True``
    refuses those files instead (``pickle.UnpicklingError``), and reads plain tensors as before.

    Scope, as narrow as pyiqa allows (it calls ``torch.load`` through the ``torch`` module from a
    dozen files, so there is no single pyiqa function to wrap): ``torch.load`` is replaced only
    for the duration of :class:`PyiqaQualityHead`'s ``pyiqa.create_metric`` call (this context),
    only calls made *from pyiqa's own modules* are changed (timm, transformers or any other
    caller, in this thread or another, gets the real function unchanged), and the real function is
    put back when the context exits, also when pyiqa raises.
    """
    with _LOAD_PATCH_LOCK:
        real_load = torch.load

        @functools.wraps(real_load)
        def load(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "pyiqa" or caller.startswith("pyiqa."):
                kwargs["weights_only"] = True
            return real_load(*args, **kwargs)

        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


@contextlib.contextmanager
def _torch_flags_preserved() -> Iterator[None]:
    """Restore torch's global cuDNN and determinism switches after pyiqa code ran.

    pyiqa's ``set_random_seed`` sets ``cudnn.benchmark = False`` and ``cudnn.deterministic = True``
    for the whole process, and its ``InferenceModel.forward`` switches cuDNN flags on each call.
    """
    cudnn = torch.backends.cudnn
    saved = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic = saved
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextlib.contextmanager
def _pyiqa_downloads(pyiqa, metric_name: str) -> Iterator[None]:
    """Route pyiqa's weight downloads through one error path.

    pyiqa fixes its cache folder (``torch.hub.get_dir()/pyiqa``) when it is first imported; this
    re-reads it, so ``TORCH_HOME`` set later still applies. With ``HF_HUB_OFFLINE`` set, a missing
    file fails at once instead of trying the network.
    """
    download_util = importlib.import_module("pyiqa.utils.download_util")
    cache_dir = os.path.join(torch.hub.get_dir(), "pyiqa")
    saved_dir, saved_download = download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file

    def guarded_download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        if _hub_offline():
            raise PyiqaWeightsError(
                _weights_message(metric_name, url, dst, "HF_HUB_OFFLINE is set")
            )
        try:
            saved_download(url, dst, *args, **kwargs)
        except OSError as err:
            raise PyiqaWeightsError(_weights_message(metric_name, url, dst, repr(err))) from err

    download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file = (
        cache_dir,
        guarded_download,
    )
    try:
        yield
    except PyiqaWeightsError:
        raise
    except OSError as err:  # a backbone fetched through the Hugging Face hub (timm, transformers)
        raise PyiqaWeightsError(_weights_message(metric_name, None, cache_dir, repr(err))) from err
    except ImportError as err:
        if "pkg_resources" not in str(err):
            raise
        raise ImportError(
            f"pyiqa metric {metric_name!r} uses openai-clip, which imports pkg_resources (removed "
            "in setuptools 82): `pip install 'setuptools<82'`."
        ) from err
    finally:
        download_util.DEFAULT_CACHE_DIR, download_util.download_url_to_file = (
            saved_dir,
            saved_download,
        )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _weights_message(metric_name: str, url: str | None, dst: str, reason: str) -> str:
    folder = os.path.dirname(dst) if url else dst
    wanted = f"{os.path.basename(dst)} (from {url})" if url else "its backbone weights"
    return (
        f"pyiqa metric {metric_name!r} needs {wanted}, which is not in pyiqa's cache folder "
        f"{folder} and could not be downloaded ({reason}). Fix: on a machine with network, run "
        f"`pyiqa.create_metric({metric_name!r})` once and copy the cache folder here, or set the "
        "environment variable TORCH_HOME so that $TORCH_HOME/hub/pyiqa holds the file (backbones "
        "fetched from the Hugging Face hub live under HF_HOME), or pass pretrained_model_path=..."
    )
