"""The run directory: resolved config, metrics, image grids, reward curve, atomic checkpoints.

runs/<name>/
  config.yaml            resolved config
  metrics.jsonl          one JSON object per epoch (plus a final evaluation row)
  events.*               TensorBoard
  samples/epoch_N.png    evaluation image grids
  reward_curve.png       evaluation (and training) reward vs reward queries
  checkpoints/step_N/    LoRA (diffusers format), learner state, counters; N = epochs done
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.config import RunConfig, dump_config

_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be resumed from."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` all at once: a crash leaves the old file or the new one, never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.samples_dir = self.path / "samples"
        self.metrics_path = self.path / "metrics.jsonl"
        self._tb = None

    def create(self, cfg: RunConfig, resume: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        self.samples_dir.mkdir(exist_ok=True)
        write_atomic(self.path / "config.yaml", dump_config(cfg))
        for left in self.ckpt_dir.glob(".tmp-step_*"):  # checkpoints a crash cut off before their rename
            shutil.rmtree(left, ignore_errors=True)
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        if not resume:  # a new run's base evaluation is its own
            for old in self.samples_dir.glob("eval_base_*.safetensors"):
                old.unlink()
        if cfg.output.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path))
            except ImportError:  # pragma: no cover - tensorboard is a declared dependency
                self._tb = None

    # ------------------------------------------------------------------ metrics
    def log(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            step = int(row.get("reward_queries", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl. A last line cut off (a crash or a full disk during its write) is left out:
        the resume that follows rewrites the file without it. Any other line that does not parse is an error
        naming it."""
        if not self.metrics_path.exists():
            return []
        lines = [(i, ln) for i, ln in enumerate(self.metrics_path.read_text().splitlines(), 1) if ln.strip()]
        rows = []
        for k, (i, ln) in enumerate(lines):
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError as e:
                if k == len(lines) - 1:
                    break
                raise CheckpointError(f"{self.metrics_path}, line {i}: not a JSON row ({e.msg}); remove or repair that "
                                      "line") from e  # fmt: skip
        return rows

    def truncate_metrics(self, epochs_done: int) -> None:
        """Keep only rows of epochs before `epochs_done` (a resumed run rewrites later ones), replacing the file
        at once (a crash while rewriting it must not lose the rows kept)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) < epochs_done and not r.get("final_eval")]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------------- images
    def save_grid(self, images: torch.Tensor, name: str, nrow: int, labels: list[str] | None = None,
                  max_rows: int = 24, scores: list[float] | None = None) -> Path:  # fmt: skip
        """Save images [B, 3, H, W] in [0, 1] (or uint8) as one PNG grid under samples/, `nrow` images a
        row; with `labels` (one per row, e.g. the prompt) each row is captioned on its left, with `scores`
        (one per image, e.g. its reward) each image carries its score in its lower left corner. At most
        `max_rows` rows are drawn."""
        from PIL import Image, ImageDraw
        from torchvision.utils import make_grid

        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        nrow = max(1, nrow)
        images = images[: nrow * max_rows]
        grid = make_grid(images, nrow=nrow, padding=1, pad_value=255)
        pic = Image.fromarray(grid.permute(1, 2, 0).numpy())
        if scores is not None:
            draw = ImageDraw.Draw(pic)
            h, w = images.shape[-2] + 1, images.shape[-1] + 1
            for i, score in enumerate(scores[: images.shape[0]]):
                x, y = (i % nrow) * w + 1, (i // nrow) * h + h - 12
                text = f"{score:.2f}"
                draw.rectangle((x, y, x + 6 * len(text) + 2, y + 11), fill="white")
                draw.text((x + 1, y), text, fill="black")
        if labels:
            rows = math.ceil(images.shape[0] / nrow)
            h = images.shape[-2] + 1
            width = 6 * max(len(t) for t in labels[:rows]) + 8
            canvas = Image.new("RGB", (pic.width + width, pic.height), "white")
            canvas.paste(pic, (width, 0))
            draw = ImageDraw.Draw(canvas)
            for r, text in enumerate(labels[:rows]):
                draw.text((4, r * h + h // 2 - 5), text, fill="black")
            pic = canvas
        out = self.samples_dir / f"{name}.png"
        pic.save(out)
        return out

    def save_eval_base(self, name: str, scores: dict[str, torch.Tensor]) -> Path:
        """Keep the base policy's per-image evaluation scores of set `name` (samples/eval_base_<name>.safetensors)."""
        out = self.samples_dir / f"eval_base_{name}.safetensors"
        tmp = out.with_suffix(".tmp")
        save_file({k: v.float().contiguous() for k, v in scores.items()}, str(tmp))
        tmp.replace(out)
        return out

    def load_eval_base(self, name: str, n: int) -> dict[str, torch.Tensor] | None:
        """The base policy's per-image scores of set `name`, if kept and of `n` images (else None)."""
        path = self.samples_dir / f"eval_base_{name}.safetensors"
        if not path.is_file():
            return None
        scores = load_file(str(path))
        return scores if all(v.shape == (n,) for v in scores.values()) else None

    def save_eval_images(self, name: str, images: torch.Tensor, prompts: list[str]) -> Path:
        """Keep evaluation images uint8 [N, 3, H, W] with their prompts (samples/<name>.safetensors), e.g.
        to measure the final policy's diversity later."""
        out = self.samples_dir / f"{name}.safetensors"
        save_file(
            {"images": images.to(torch.uint8).contiguous()},
            str(out),
            metadata={"prompts": json.dumps(prompts)},
        )
        return out

    @staticmethod
    def eval_tag(tag: str, name: str, n_sets: int) -> str:
        """The file name of evaluation set `name`'s images at `tag` (e.g. "epoch_0024_final"): the set's name is
        appended only when a run has several evaluation sets."""
        return f"{tag}_{name}" if n_sets > 1 else tag

    def final_eval_images(self, name: str, n_sets: int) -> Path | None:
        """The last kept final-evaluation images of set `name` (samples/epoch_*_final[_<set>].safetensors)."""
        finals = sorted(self.samples_dir.glob(self.eval_tag("epoch_*_final", name, n_sets) + ".safetensors"))
        return finals[-1] if finals else None

    @staticmethod
    def load_eval_images(path: Path) -> tuple[torch.Tensor, list[str]]:
        """(images uint8 [N, 3, H, W], prompts) saved by save_eval_images."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("images"), json.loads(f.metadata()["prompts"])

    def _curve_labels(self) -> tuple[str, str]:
        """(label of the training curve, "<eval reward>, " when evaluation uses another reward) from the run's
        config.yaml: which reward each curve shows and whether training rollouts explored."""
        import yaml

        try:
            data = yaml.safe_load((self.path / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return "training rollouts", ""

        def names(reward: dict | None) -> str:
            return "+".join(t.get("name", "?") for t in (reward or {}).get("terms", []))

        train = names(data.get("reward"))
        explore = (data.get("exploration") or {}).get("enabled", False)
        label = f"training rollouts ({train}{', with exploration' if explore else ''})" if train else "training rollouts"
        ev = names((data.get("eval") or {}).get("reward"))
        return label, (f"{ev}, " if ev and ev != train else "")

    def plot_reward_curve(self) -> Path | None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        sets = sorted(
            {k[5:-12] for r in rows for k in r if k.startswith("eval_") and k.endswith("_reward_mean")}
        )
        sets = [s for s in sets if s != "reward"] or [
            "reward"
        ]  # per-set curves when several sets are evaluated
        tr = [(r["reward_queries"], r["reward_mean"]) for r in rows if "reward_mean" in r]
        if not tr and not any("eval_reward_mean" in r for r in rows):
            return None
        train_label, eval_reward = self._curve_labels()
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for name in sets:
            key = "eval_reward" if name == "reward" else f"eval_{name}_reward"
            ev = [(r["eval_reward_queries"], r[key + "_mean"], r.get(key + "_ci95", 0.0)) for r in rows
                  if key + "_mean" in r]  # fmt: skip
            if not ev:
                continue
            x, y, s = zip(*ev)
            label = "evaluation" if name == "reward" else f"evaluation: {name}"
            ax.errorbar(
                x, y, yerr=s, marker="o", capsize=3, label=label + f" ({eval_reward}plain prompts, constant CFG; 95% CI)"
            )
        if tr:
            x, y = zip(*tr)
            ax.plot(x, y, alpha=0.6, label=train_label)
        ax.set_xlabel("reward queries (training images scored)")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = self.path / "reward_curve.png"
        fig.savefig(out)
        plt.close(fig)
        return out

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epochs_done: int, state: dict, counters: dict) -> Path:
        """Write checkpoints/step_N atomically: everything goes to a temporary folder that is renamed last.
        `state["lora_files"]` are the LoRA's diffusers files as bytes (the learner writes them, so the driver
        never imports diffusers)."""
        final = self.ckpt_dir / f"step_{epochs_done}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{epochs_done}-", dir=self.ckpt_dir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as any directory the run makes (mkdtemp's are private)
        try:
            for name, data in state["lora_files"].items():
                if Path(name).name != name:
                    raise ValueError(f"checkpoint file name {name!r} is not a plain file name")
                (tmp / name).write_bytes(data)
            save_file(state["lora"], str(tmp / "lora_state.safetensors"))
            torch.save(state["learner"], tmp / "learner_state.pt")
            (tmp / "counters.json").write_text(json.dumps(counters, indent=1))
            for f in tmp.iterdir():  # on disk before the rename makes the checkpoint count (a power loss
                os.chmod(f, 0o666 & ~umask)  # could otherwise leave a complete-looking step_N of empty files)
                _fsync(f)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(self.ckpt_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def checkpoints(self) -> list[Path]:
        """Every complete checkpoint (checkpoints/step_N; half-written ones are temporary folders), by N."""
        if not self.ckpt_dir.is_dir():
            return []
        steps = [
            (int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(steps)]

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoints()
        return steps[-1] if steps else None

    def load_checkpoint(self, path: Path) -> tuple[dict, dict, dict]:
        """(lora state, learner state, counters) of a complete checkpoint."""
        try:
            lora = load_file(str(path / "lora_state.safetensors"))
            learner = torch.load(path / "learner_state.pt", weights_only=True)
            counters = json.loads((path / "counters.json").read_text())
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {path}: unreadable ({err.__class__.__name__}: {err})"
            ) from None
        return lora, learner, counters
