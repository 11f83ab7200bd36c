"""Finds jobs by name (and version) from the modules named in a setting."""
from __future__ import annotations

import importlib
from collections.abc import Iterable

from essential.orchestration.dsl import Job
from essential.orchestration.errors import JobModuleMissing, JobVersionMissing, UnknownJob


class JobRegistry:
    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self._jobs: dict[str, dict[int, Job]] = {}
        for job in jobs:
            self.add(job)

    @classmethod
    def from_modules(cls, modules: Iterable[str]) -> "JobRegistry":
        """Import each module and register every module-level :class:`Job` in it."""
        registry = cls()
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise JobModuleMissing(module_name, str(exc)) from exc
            for value in vars(module).values():
                if isinstance(value, Job):
                    registry.add(value)
        return registry

    def add(self, job: Job) -> None:
        versions = self._jobs.setdefault(job.name, {})
        existing = versions.get(job.version)
        if existing is not None and existing is not job:
            raise ValueError(f"job {job.name} v{job.version} registered twice")
        versions[job.version] = job

    def names(self) -> list[str]:
        return sorted(self._jobs)

    def get(self, name: str, version: int | None = None) -> Job:
        """Latest version when ``version`` is None (new sagas), exact version otherwise."""
        versions = self._jobs.get(name)
        if not versions:
            raise UnknownJob(name, self.names())
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise JobVersionMissing(name, version, sorted(versions)) from None

    def __contains__(self, name: str) -> bool:
        return name in self._jobs
