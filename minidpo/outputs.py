"""What a run writes to output_dir: resumable checkpoints, the final model with its model card, the Hub upload.

    output_dir/checkpoint-N/   the policy in the HF layout (loadable as it is), plus what resuming
                               needs: state/ (DCP: model and optimizer shards), rng-rank{r}.safetensors,
                               trainer_state.json (step, schedule, world size, flags)
    output_dir/                the final model in the HF layout, README.md (the model card)

With LoRA (--use_peft) "the model" is the adapter in PEFT's layout (lora.py), and state/ holds only
the adapters and their optimizer state: the frozen base is the one the run started from.

Every directory is built under a temporary name and renamed when complete (common.py)."""

import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path, PosixPath

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import filesystem, metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .checkpoint import write_pretrained
from .common import COUNT, OBJECT, SIZE, check_keys, error_line, replace_dir, temp_dir_beside, temp_name, write_json
from .distributed import Dist, barrier, full_state_dict
from .lora import write_adapter

# Without a process group (one process), DCP warns at every save and load that it assumes one process:
# that is the intent, and the warning's two lines would bury the log and the one-line errors.
DCP_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
# Resuming needs no frozen weights (LoRA's base). Not strict when setting, as the frozen ones are
# absent; DCP's load has already failed on any trained weight missing from the checkpoint.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


# What DCP's .metadata pickle may name (found by listing a minidpo checkpoint's): DCP's metadata
# dataclasses, torch.Size, dtypes, layouts by name, the checkpoint's path. Nothing that runs code.
DCP_METADATA_CLASSES = {
    **{("torch.distributed.checkpoint.metadata", name): getattr(metadata, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): PosixPath}
TRAINER_STATE_KEYS = {"step": COUNT, "world_size": SIZE, "scheduler": OBJECT}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in DCP_METADATA_CLASSES:
            return DCP_METADATA_CLASSES[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"its .metadata names {module}.{name}, which DCP metadata never holds")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, but .metadata loads only DCP metadata's classes (plain pickle would run whatever a planted
    object's __reduce__ says) and may name only plain file names in the checkpoint's directory."""

    def read_metadata(self, *args, **kwargs):
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            meta = MetadataUnpickler(f).load()
        if not isinstance(meta, metadata.Metadata) or not isinstance(meta.storage_data, dict):
            raise ValueError("its .metadata is not DCP metadata")
        for info in meta.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"its .metadata names the data file {name!r}, outside the checkpoint")
        if not isinstance(meta.storage_meta, metadata.StorageMeta):  # as DCP's own read_metadata
            meta.storage_meta = metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafePlanner(DefaultLoadPlanner):
    """DCP's planner, loading non-tensor values (optimizer settings) with weights_only=True, not full pickle."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)  # raises on anything else
        value.seek(0)
        super().load_bytes(read_item, value)


def dcp_error(e: BaseException) -> BaseException:
    # DCP wraps each rank's error in a CheckpointException, a BaseException: the one inside.
    return next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e


class Checkpoints:
    """The checkpoint-N directories of one output_dir, written by every rank together."""

    def __init__(self, output_dir: Path, dist: Dist, limit: int | None = None):
        self.output_dir, self.dist, self.limit = Path(output_dir), dist, limit

    def save(self, step: int, model, optimizer, scheduler, tokenizer, config: dict, generator=None):
        final = self.output_dir / f"checkpoint-{step}"
        tmp = temp_name(final)  # every rank writes into it; rank 0 makes it
        if self.dist.is_main:
            temp_dir_beside(final)
        barrier()
        try:
            self.write(tmp, step, model, optimizer, scheduler, tokenizer, config, generator)
        except (Exception, dcp.CheckpointException) as e:  # e.g. a full disk
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"could not write checkpoint {final} ({error_line(dcp_error(e))})") from None
        barrier()
        if self.dist.is_main:
            replace_dir(tmp, final)
            self.prune()
        barrier()

    def write(self, tmp: Path, step: int, model, optimizer, scheduler, tokenizer, config: dict, generator):
        model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "state")
        rng = {"generator": generator.get_state()} if generator is not None else {}
        save_file(rng | {"torch": torch.get_rng_state()}, tmp / f"rng-rank{self.dist.rank}.safetensors")
        full = full_state_dict(model)  # a collective: every rank takes part, rank 0 gets the tensors
        if self.dist.is_main:
            write_model(full, model, tmp, tokenizer)
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": self.dist.world_size,
                     "config": config}
            write_json(tmp / "trainer_state.json", state)

    def all(self) -> list[Path]:
        """output_dir's checkpoint-N directories, oldest first (other names, e.g. checkpoint-best, are left be)."""
        found = [p for p in self.output_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def prune(self):
        for old in self.all()[: -self.limit] if self.limit else []:
            shutil.rmtree(old)

    def find(self, where: str) -> Path:
        if where.lower() in ("true", "last", "latest"):  # HF's --resume_from_checkpoint True: the newest one
            checkpoints = self.all()
            if not checkpoints:
                raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint-* in {self.output_dir}")
            return checkpoints[-1]
        path = Path(where)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a minidpo checkpoint "
                                    "(no trainer_state.json)")
        return path

    def load(self, path: Path, model, optimizer, scheduler, generator=None) -> int:
        """Restore everything save() wrote into the given objects; returns the step to continue from."""
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--resume_from_checkpoint: cannot read {path / 'trainer_state.json'} ({e})") from None
        if not (isinstance(state, dict) and TRAINER_STATE_KEYS.keys() <= state.keys()):
            # e.g. a checkpoint of HF's Trainer, whose trainer_state.json holds other things
            raise ValueError(f"--resume_from_checkpoint: {path} was not written by minidpo "
                             "(its trainer_state.json lacks step, world_size or scheduler)")
        where = f"--resume_from_checkpoint: {path / 'trainer_state.json'}"
        check_keys(state, TRAINER_STATE_KEYS, where)
        ours = scheduler.state_dict()  # the saved one must have its keys, with values (and items) of the same types
        kinds = lambda v: [type(v), *map(type, v)] if isinstance(v, list) else [type(v)]  # noqa: E731
        for key, value in state["scheduler"].items():
            if key not in ours or kinds(value) != kinds(ours[key]):
                raise ValueError(f"{where}: scheduler has {key!r} = {json.dumps(value)[:60]}, not a value of ours")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"--resume_from_checkpoint: {path} was written by {state['world_size']} process(es); "
                             f"resume with the same number (this run has {self.dist.world_size})")
        model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
        both = {"model": model_state, "optim": optim_state}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
                reader = SafeReader(path / "state")
                # Read once before DCP does: DCP would log a failure with its traceback and retry elsewhere.
                reader.read_metadata()
                dcp.load(both, storage_reader=reader, planner=SafePlanner())
            rng = load_file(path / f"rng-rank{self.dist.rank}.safetensors")
        except (Exception, dcp.CheckpointException) as e:
            raise ValueError(f"--resume_from_checkpoint: {path} is unreadable ({error_line(dcp_error(e))})") from None
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                       options=TRAINED_ONLY)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
        if generator is not None and "generator" in rng:
            generator.set_state(rng["generator"])
        return state["step"]


def save_final(output_dir: Path, model, tokenizer, card: str, dist: Dist):
    """The trained model in output_dir itself, in the HF layout, with its model card."""
    full = full_state_dict(model)  # a collective: every rank takes part, rank 0 gets the tensors
    if dist.is_main:
        tmp = temp_dir_beside(output_dir / "model")
        write_model(full, model, tmp, tokenizer)
        (tmp / "README.md").write_text(card)
        publish(tmp, output_dir)
        print(f"saved the model to {output_dir}", file=sys.stderr)
    barrier()


def write_model(state: dict, model, out_dir: Path, tokenizer):
    """The model's files: the HF layout, or with LoRA the adapter in PEFT's layout."""
    if hasattr(model, "lora"):
        write_adapter(state, model, out_dir)
    else:
        write_pretrained(state, model.cfg, out_dir, tokenizer)


def publish(tmp: Path, target: Path):
    """Move tmp's files into target, over an earlier model's (target also holds checkpoints and logs: it cannot be
    swapped whole). One weights file replaces the old in one rename; shards cannot: the old weights go first, the
    new index and then config.json last: a crash between leaves a model no loader accepts, never mixed shards."""
    index = "model.safetensors.index.json"  # (an adapter's two files replace the old ones)
    sharded = (tmp / index).exists()
    for old in [target / index, *target.glob("model*.safetensors")]:
        if old.exists() and (sharded or not (tmp / old.name).exists()):
            old.unlink()
    move_order = {index: 1, "config.json": 2}  # everything else (0) first
    for f in sorted(tmp.iterdir(), key=lambda p: move_order.get(p.name, 0)):
        os.replace(f, target / f.name)
    tmp.rmdir()


def model_card(cfg, steps: int, metrics: dict) -> str:
    judge = cfg.judge or cfg.reward_model_path or ", ".join(cfg.reward_funcs or [])
    lines = ["---", "library_name: minidpo", "tags: [online-dpo, minidpo]", "---", "",
             f"# {Path(cfg.output_dir).name}", "", f"Trained with minidpo's online DPO ({cfg.loss_type} loss) from "
             f"`{cfg.model_name_or_path}` on `{cfg.dataset_name}` for {steps} steps; preferences from `{judge}`.", "",
             "| setting | value |", "| --- | --- |"]
    for name in ("learning_rate", "beta", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_new_tokens", "max_length", "temperature", "missing_eos_penalty", "bf16", "seed"):
        lines.append(f"| {name} | {getattr(cfg, name)} |")
    if metrics:
        lines += ["", "Last logged metrics:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def push_to_hub(output_dir: Path, repo_id: str | None, token: str | None):
    from huggingface_hub import HfApi

    repo_id = repo_id or output_dir.name
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=output_dir,
                          ignore_patterns=["checkpoint-*", ".*", "metrics.jsonl", "completions.jsonl", "runs/*"])
    except Exception as e:
        raise RuntimeError(f"--push_to_hub: upload to {repo_id!r} failed ({error_line(e)}); "
                          f"the model is saved in {output_dir}") from None
