"""Diffusion processes: noising, training targets, x0 recovery and the late-denoising gate."""

from acpo_lightning.processes.base import DiffusionProcess
from acpo_lightning.processes.flow import FlowProcess, is_flow_scheduler
from acpo_lightning.processes.vp import VPProcess

__all__ = ["DiffusionProcess", "FlowProcess", "VPProcess", "is_flow_scheduler"]
