"""One interface, several backends (as the Kubeflow SDK's TrainerClient has): each runs
the stages of a plan in order, skipping finished ones, and can cancel a run."""

from __future__ import annotations

from typing import Protocol

from jobs.contract import Manifest
from pipeline.config import Plan


class Backend(Protocol):
    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]: ...

    def delete(self, plan: Plan) -> int: ...


def get_backend(name: str, **options) -> Backend:
    if name == "local":
        from pipeline.backends.local import LocalBackend

        return LocalBackend(**options)
    if name == "kubernetes":
        from pipeline.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(**options)
    raise ValueError(f"unknown backend {name!r}")
