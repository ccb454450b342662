"""From a configured project to the engine's inputs: its profile and a per-subject context."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fiona.anonymizer.engine import Context
from fiona.anonymizer.profile import Profile, load_profile
from fiona.anonymizer.uids import make_scheme
from fiona.config import FionaConfig, read_secret
from fiona.errors import ConfigError
from fiona.keys import load_node_key, load_or_create_key, project_key_path

__all__ = ["ProjectDeidentification", "project_deidentification"]


@dataclass(frozen=True, slots=True)
class ProjectDeidentification:
    """A project's profile and the context factory for its subjects."""

    project: str
    profile: Profile
    scheme_name: str
    date_offset_days: int
    _secret: bytes | None
    _global_key: bytes
    sites: Mapping[str, str] = field(default_factory=dict)
    """Site code → name (``projects.<ID>.sites``): a request's site names ClinicalTrialSiteName."""

    def context(
        self,
        pseudonym: str,
        *,
        event: str = "",
        site: str = "",
        site_name: str = "",
        patient_name: str | None = None,
        date_offset_days: int | None = None,
    ) -> Context:
        """The context for one subject (a transfer request may carry its own date offset)."""
        scheme = make_scheme(
            self.scheme_name, self.project, secret=self._secret, global_key=self._global_key
        )
        return Context(
            project=self.project,
            pseudonym=pseudonym,
            scheme=scheme,
            date_offset_days=(
                self.date_offset_days if date_offset_days is None else date_offset_days
            ),
            patient_name=patient_name,
            event=event,
            site=site,
            site_name=site_name or self.sites.get(site, ""),
        )

    def __repr__(self) -> str:  # never show the secrets
        return f"ProjectDeidentification({self.project}, {self.profile.label}, {self.scheme_name})"


def project_deidentification(config: FionaConfig, project: str) -> ProjectDeidentification:
    """Load *project*'s profile and secrets from the configuration."""
    settings = config.projects.get(project)
    if settings is None:
        known = ", ".join(sorted(config.projects)) or "none"
        raise ConfigError(
            str(config.source), [("projects", f"no project {project!r} (configured: {known})")]
        )
    secret: bytes | None = None
    if settings.uid_scheme == "hmac":
        if settings.secret_file is not None:
            try:
                secret = read_secret(settings.secret_file)
            except ValueError as exc:
                raise ConfigError(
                    str(config.source), [(f"projects.{project}.secret_file", str(exc))]
                ) from None
        else:
            secret = load_or_create_key(project_key_path(config.storage.path, project))
    return ProjectDeidentification(
        project=project,
        profile=load_profile(settings.profile),
        scheme_name=settings.uid_scheme,
        date_offset_days=settings.date_offset_days,
        _secret=secret,
        _global_key=load_node_key(config.storage.path),
        sites=dict(settings.sites),
    )
