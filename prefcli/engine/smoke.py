"""What `--smoke` needs from the Hugging Face hub, checked before anything runs.

A smoke run swaps the model for a tiny random one of the same family, but it still reads two small files
of a hub model: its tokenizer (the real one: the data is tokenized as the real run would) and its
config.json (the family to shrink). Both are a few MB, fetched once into the hub cache
(~/.cache/huggingface/hub, or HF_HUB_CACHE). When they are neither a local folder nor in that cache and the
hub cannot be reached (HF_HUB_OFFLINE=1, or no network), the run stops at once with exit 2 and says how to
provide them, instead of retrying the hub for a minute.

When the tokenizer is at hand (a local folder, or cached) but the model's config is not, smoke needs
nothing else: the tiny model is then a llama-shaped one (`model.init`), and the saved recipe.yaml shows it.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..errors import UsageError
from ..recipe.paths import is_local

FALLBACK_ARCHITECTURE = "llama"  # the generic decoder, used when a hub model's config.json is out of reach


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint, no retries (huggingface_hub retries a lost hub for ~25 s a file)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def cached(repo: str, filename: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)


class _Hub:
    def __init__(self):
        self._online: bool | None = None

    def has(self, repo: str, files: tuple[str, ...], revision: str | None = None) -> bool:
        """The files are in the cache, or the hub can be reached to fetch them."""
        if all(cached(repo, f, revision) for f in files):
            return True
        if self._online is None:
            self._online = hub_reachable()
        return self._online


def _offline_reason() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"


def prepare_smoke(recipe, warn):
    """The smoke recipe with what it needs from the hub checked: returned unchanged, or with a hub model whose
    config is out of reach replaced by a tiny llama (when its tokenizer is at hand); UsageError otherwise."""
    hub = _Hub()
    data = recipe.model_dump()
    needs: list[str] = []
    swapped: list[str] = []

    def model_like(section: dict, field: str, tokenizer_default: str | None) -> None:
        path, rev = section.get("path"), section.get("revision")
        tok = section.get("tokenizer") or tokenizer_default or path
        tok_field = f"{field}.tokenizer" if section.get("tokenizer") else f"{field}.path"
        tok_ok = tok is not None and (is_local(tok) or hub.has(tok, ("tokenizer_config.json",), rev))
        cfg_ok = (
            section.get("init") is not None or path is None or is_local(path) or hub.has(path, ("config.json",), rev)
        )
        if not tok_ok and not cfg_ok and tok == path:
            needs.append(f"the tokenizer and config.json of '{path}' ({field}.path)")
            return
        if tok is not None and not tok_ok:
            needs.append(f"the tokenizer of '{tok}' ({tok_field})")
        if cfg_ok:
            return
        if tok_ok:
            section.update(path=None, init={"architecture": FALLBACK_ARCHITECTURE, "config": {}}, tokenizer=tok)
            swapped.append(f"{field}.path '{path}'")
        else:
            needs.append(f"the config.json of '{path}' ({field}.path)")

    model_like(data["model"], "model", None)
    if "discriminator" in data:  # gan: its own model, or the generator's
        d = data["discriminator"]
        if d.get("path") is not None:
            model_like(d, "discriminator", None)
    for i, spec in enumerate(data.get("rewards") or []):
        if spec.get("kind") == "model" and not is_local(spec["path"]) and not hub.has(spec["path"], ("config.json",)):
            needs.append(f"the whole reward model '{spec['path']}' (rewards[{i}].path)")
    if needs:
        raise UsageError(
            f"--smoke needs, from the Hugging Face hub, {'; '.join(needs)}, and {_offline_reason()} and the hub "
            f"cache ({_cache_dir()}) does not have them. The tokenizer and config are a few MB, fetched once: run "
            "once with network access, or keep the hub cache between CI runs (docs/ci.md), or point at local "
            "copies with --set model.path=/path/to/model or --set model.tokenizer=/path/to/tokenizer (with a "
            "local tokenizer, smoke needs nothing else)."
        )
    if not swapped:
        return recipe
    warn(
        f"--smoke: the config of {', '.join(swapped)} is not in the hub cache and {_offline_reason()}; the tiny "
        f"random model is a {FALLBACK_ARCHITECTURE} instead of that model's family (the tokenizer is the real one)"
    )
    return type(recipe).model_validate(data)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return os.path.expanduser(constants.HF_HUB_CACHE)
