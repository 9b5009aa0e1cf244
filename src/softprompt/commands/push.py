"""`softprompt push`: a prompt folder to the Hugging Face Hub, with its model card."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from softprompt.artifacts import (
    ADAPTER_WEIGHTS,
    PROMPT_FILES,
    load_prompt,
)
from softprompt.config import PushConfig
from softprompt.console import say
from softprompt.errors import ArtifactError, SoftpromptError
from softprompt.hub import model_card


def push(cfg: PushConfig) -> str:
    """Upload the prompt's files and its model card to ``cfg.repo_id`` (created if needed);
    returns the repository's URL."""
    folder = Path(cfg.prompt_dir)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"{folder} holds no saved prompt ({ADAPTER_WEIGHTS} missing)")
    load_prompt(folder)  # schema-checked before anything leaves the machine
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=cfg.token)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for name in PROMPT_FILES:
            if name != "README.md" and (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
        (stage / "README.md").write_text(model_card(folder, cfg.repo_id), encoding="utf-8")
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
            message = cfg.message or f"softprompt push {folder.name}"
            api.upload_folder(repo_id=cfg.repo_id, folder_path=stage, commit_message=message)
        except HfHubHTTPError as err:
            first = str(err).strip().splitlines()[0]
            raise SoftpromptError(
                f"cannot push to {cfg.repo_id}: {first} (log in with `hf auth login` or give "
                "--token)"
            ) from None
    url = f"https://huggingface.co/{cfg.repo_id}"
    say(f"pushed {folder} to {url}; use it with --prompt hf:{cfg.repo_id}")
    return url


def main(cfg: PushConfig) -> None:
    """The command: upload, then print where it went."""
    print(push(cfg))
