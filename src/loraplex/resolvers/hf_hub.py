"""The Hugging Face Hub resolver (plugin `lora_hf_hub_resolver`).

VLLM_LORA_RESOLVER_HF_REPO_LIST names the repos adapters may come from, as vLLM
does: the adapter `org/repo` (or `org/repo/`) is the repo's root, `org/repo/sub/dir`
a subfolder; either must hold an adapter_config.json. An entry `org/repo@rev` pins
a branch, tag or commit (default: VLLM_LORA_RESOLVER_HF_REVISION, else "main").

Files come through huggingface_hub (so HF_ENDPOINT, HF_TOKEN and the HF cache
work), then are hard-linked (or copied) into the AdapterCache and validated there.
The request points into the AdapterCache, not into the HF cache's snapshot as in
vLLM: there the adapter's files are validated and recorded, kept within the
cache's size bound, and the directory holds that one adapter only.

As in vLLM, a folder whose adapter is not a LoRA, or is one for another base
model, is "not mine": None, with the reason reported to the chain.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import AdapterMismatchError, ConfigError, ResolverError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.plugins import hookimpl
from loraplex.resolvers.base import LoRAResolver, report_skipped
from loraplex.resolvers.cache import AdapterCache, check_cache_name
from loraplex.resolvers.env import env_seconds
from loraplex.resolvers.names import check_adapter_name
from loraplex.resolvers.source import AdapterSource, RemoteAdapter, RemoteFile
from loraplex.resolvers.validation import CONFIG_FILE

logger = logging.getLogger(__name__)

PLUGIN_NAME = "lora_hf_hub_resolver"
REPO_LIST_ENV = "VLLM_LORA_RESOLVER_HF_REPO_LIST"
REVISION_ENV = "VLLM_LORA_RESOLVER_HF_REVISION"
RELIST_ENV = "LORAPLEX_RESOLVER_HF_RELIST_S"
DEFAULT_RELIST_S = 30.0


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str


@dataclass
class _RepoSnapshot:
    """One listing of a repo at one commit."""
    sha: str
    files: dict[str, object]            # path in repo -> huggingface_hub RepoFile
    fetched_at: float = field(default_factory=time.monotonic)

    def adapter_files(self, subfolder: str) -> list[object] | None:
        prefix = f"{subfolder}/" if subfolder else ""
        direct = [f for p, f in self.files.items() if p.startswith(prefix) and "/" not in p[len(prefix):]]
        return direct if any(f.path == prefix + CONFIG_FILE for f in direct) else None


def parse_repo_list(repo_list: str | list[str], default_revision: str = "main") -> list[HubRepo]:
    entries = repo_list.split(",") if isinstance(repo_list, str) else list(repo_list)
    repos = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        repo_id, _, revision = entry.partition("@")
        try:
            check_adapter_name(repo_id)
        except Exception as e:
            raise ConfigError(f"{REPO_LIST_ENV}: {entry!r} is not a repo id: {e}") from None
        if repo_id.count("/") > 1:
            raise ConfigError(f"{REPO_LIST_ENV}: {entry!r} is not a repo id; list repos as 'org/repo' "
                              f"(or 'org/repo@revision'), not folders inside them")
        repos.append(HubRepo(repo_id, revision or default_revision))
    if not repos:
        raise ConfigError(f"{REPO_LIST_ENV} lists no repos; give comma-separated ids like 'org/repo,org/other'")
    return repos


class HfHubSource(AdapterSource):
    """Adapters in the listed Hub repos, named `org/repo` or `org/repo/sub/dir`."""

    def __init__(self, repos: list[HubRepo], *, endpoint: str | None = None, token: str | None = None,
                 hf_cache_dir: str | None = None, relist_s: float = DEFAULT_RELIST_S) -> None:
        from huggingface_hub import HfApi  # imported here: the plugin loads only when configured
        self.repos = repos
        self.endpoint = endpoint
        self.token = token
        self.hf_cache_dir = hf_cache_dir
        self.relist_s = relist_s
        self.api = HfApi(endpoint=endpoint, token=token)
        self._snapshots: dict[HubRepo, _RepoSnapshot] = {}
        self._lock = threading.Lock()

    def locate(self, lora_name: str) -> tuple[HubRepo, str] | None:
        """(repo, subfolder) that `lora_name` would live in; pure string matching, no I/O."""
        for repo in self.repos:
            if lora_name == repo.repo_id:
                return repo, ""
            if lora_name.startswith(repo.repo_id + "/"):
                return repo, lora_name[len(repo.repo_id) + 1:]
        return None

    def stat(self, lora_name: str) -> RemoteAdapter | None:
        located = self.locate(lora_name)
        if located is None:
            return None
        repo, subfolder = located
        with self._lock:
            snapshot = self._snapshots.get(repo)
        # A recent listing answers "not there" (new pushes show up within relist_s);
        # "there" is always confirmed by the Hub, since that is how changes are seen.
        fresh_negative = (snapshot is not None and snapshot.adapter_files(subfolder) is None
                          and time.monotonic() - snapshot.fetched_at < self.relist_s)
        if not fresh_negative:
            snapshot = self._fetch(repo)
        files = snapshot.adapter_files(subfolder)
        if files is None:
            return None
        return RemoteAdapter(
            location=f"hf://{repo.repo_id}{'/' + subfolder if subfolder else ''}@{repo.revision}",
            files=tuple(RemoteFile(name=f.path.rsplit("/", 1)[-1], size=f.size,
                                   tag=f.lfs.sha256 if f.lfs is not None else f.blob_id) for f in files),
            revision=snapshot.sha)

    def download(self, lora_name: str, remote: RemoteAdapter, dest: Path) -> None:
        from huggingface_hub import snapshot_download
        repo, subfolder = self.locate(lora_name)
        prefix = f"{subfolder}/" if subfolder else ""
        for force in (False, True):
            try:
                folder = snapshot_download(
                    repo.repo_id, revision=remote.revision, endpoint=self.endpoint, token=self.token,
                    cache_dir=self.hf_cache_dir, force_download=force,
                    allow_patterns=[prefix + f.name for f in remote.files])
            except Exception as e:
                raise self._error(repo, e) from None
            if _place(Path(folder) / subfolder, remote, dest):
                return
            # The HF cache holds a damaged copy (e.g. truncated through one of our hard links).
            logger.warning("the HF cache's copy of %s does not match the Hub; downloading it again", remote.location)
        raise ResolverError(f"the files of {remote.location} downloaded from the Hub do not have the sizes "
                            f"the Hub lists; retry later")

    def _fetch(self, repo: HubRepo) -> _RepoSnapshot:
        try:
            sha = self.api.model_info(repo.repo_id, revision=repo.revision).sha
            with self._lock:
                known = self._snapshots.get(repo)
            if known is not None and known.sha == sha:
                snapshot = _RepoSnapshot(sha, known.files)
            else:
                tree = self.api.list_repo_tree(repo.repo_id, revision=sha, recursive=True)
                snapshot = _RepoSnapshot(sha, {f.path: f for f in tree if hasattr(f, "blob_id")})
        except Exception as e:
            raise self._error(repo, e) from None
        with self._lock:
            self._snapshots[repo] = snapshot
        return snapshot

    def _error(self, repo: HubRepo, e: Exception) -> ResolverError:
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError, RevisionNotFoundError)
        where = f"{repo.repo_id}@{repo.revision} at {self.endpoint or 'the Hub'}"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, OfflineModeIsEnabled):
            return ResolverError(f"cannot reach {where}: HF_HUB_OFFLINE is set; unset it to let the Hub "
                                 f"resolver download adapters")
        if isinstance(e, GatedRepoError) or status in (401, 403):
            return ResolverError(f"access to {where} was refused ({status}); check HF_TOKEN")
        if isinstance(e, RevisionNotFoundError):
            return ResolverError(f"revision {repo.revision!r} of {repo.repo_id} does not exist at "
                                 f"{self.endpoint or 'the Hub'}: this is a configuration error; check "
                                 f"{REPO_LIST_ENV} / {REVISION_ENV}")
        if isinstance(e, RepositoryNotFoundError):
            return ResolverError(f"repo {repo.repo_id} (from {REPO_LIST_ENV}) does not exist at "
                                 f"{self.endpoint or 'the Hub'}, or it is private and HF_TOKEN does not "
                                 f"grant access: this is a configuration error")
        if isinstance(e, HfHubHTTPError):
            return ResolverError(f"the Hub failed on {where}: {str(e).splitlines()[0]}")
        return ResolverError(f"cannot reach {where} ({type(e).__name__}: {e}); check that the Hub "
                             f"(HF_ENDPOINT) is up and reachable")


def _place(snapshot_dir: Path, remote: RemoteAdapter, dest: Path) -> bool:
    """Hard-link (same filesystem) or copy the snapshot's files into `dest`; False if
    a file's size differs from the listing."""
    for f in remote.files:
        source = (snapshot_dir / f.name).resolve()  # the HF cache's blob, not its symlink
        if not source.is_file() or source.stat().st_size != f.size:
            return False
        target = dest / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return True


class HfHubResolver(LoRAResolver):
    """Resolves `org/repo[/sub/dir]` names from the listed Hub repos into the adapter cache.

    `HfHubResolver(repo_list)` as in vLLM works: what is not given comes from the
    environment when the resolver is built (HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, and the
    adapter cache's VLLM_LORA_RESOLVER_CACHE_DIR...), not from huggingface_hub's values
    read at its import."""

    def __init__(self, repos: str | list[str], *, cache: AdapterCache | None = None, revision: str = "main",
                 endpoint: str | None = None, token: str | None = None, hf_cache_dir: str | None = None,
                 relist_s: float = DEFAULT_RELIST_S) -> None:
        logger.warning("the Hugging Face Hub resolver downloads adapters from %s on request; only list "
                       "repos you trust", repos)
        env = os.environ
        self.source = HfHubSource(parse_repo_list(repos, revision), relist_s=relist_s,
                                  endpoint=endpoint or env.get("HF_ENDPOINT") or None,
                                  token=token or env.get("HF_TOKEN") or None,
                                  hf_cache_dir=hf_cache_dir or env.get("HF_HUB_CACHE") or None)
        self.cache = cache if cache is not None else AdapterCache.from_env()

    @classmethod
    def from_env(cls, env=os.environ) -> "HfHubResolver":
        relist_s = env_seconds(RELIST_ENV, DEFAULT_RELIST_S, allow_zero=True, env=env)
        return cls(env[REPO_LIST_ENV], cache=AdapterCache.from_env(env),
                   revision=env.get(REVISION_ENV) or "main", endpoint=env.get("HF_ENDPOINT") or None,
                   token=env.get("HF_TOKEN") or None, hf_cache_dir=env.get("HF_HUB_CACHE") or None,
                   relist_s=relist_s)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        check_cache_name(lora_name)  # before any I/O
        # 'org/repo/' is the adapter 'org/repo', served under the name it was asked by.
        located_name = lora_name.rstrip("/")
        if self.source.locate(located_name) is None:
            return None
        try:
            found = await self.cache.resolve(located_name, self.source, base_model_name)
        except AdapterMismatchError as e:
            report_skipped(str(e))
            return None
        if found is None or located_name == lora_name:
            return found
        return LoRARequest(lora_name, lora_id_for_name(lora_name), found.lora_path, base_model_name)


@hookimpl
def register_lora_resolvers(register):
    if os.environ.get(REPO_LIST_ENV):
        register(PLUGIN_NAME, HfHubResolver.from_env())
