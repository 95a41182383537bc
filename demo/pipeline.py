"""eve-demo's steps, in order, each done once: world -> stand-ins -> curation -> stages 1-3 -> eval
-> report. A finished step leaves DIR/done/<step>.json; a re-run skips it. An interrupted step is
resumed by the tool itself (eve-curate's shards, eve-train's checkpoints, eve-eval's records) or,
for the short ones that write a folder, redone from a clean folder.

Families: EVE (v1) trains in DIR itself; EVEv2 (`--family eve2` or `both`) trains on the same
world, stand-ins and curated data in DIR/eve2 (steps `eve2-stage1` ...), and `eve2dense` (in
`--family all`) is EVEv2 without its modality experts, the ablation that isolates them: the same
patch embedding and stages, its decoder trained where EVEv2 trains the experts. With more than
EVE in the run, a `language` step measures how much text each decoder kept (demo/language.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from demo.datasets import write_eval, write_pool, write_sft
from demo.plan import DemoPlan

log = logging.getLogger("eve-demo")
SHARED_STEPS = ("world", "decoder", "teacher", "curate")
FAMILY_STEPS = ("stage1", "stage2", "stage3", "eval")
FAMILIES = ("eve", "eve2", "eve2dense")  # no "-" in a name: step names are family-step


@dataclasses.dataclass
class Demo:
    out: Path
    plan: DemoPlan
    seed: int
    quick: bool
    families: tuple[str, ...] = ("eve",)

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families must be some of {FAMILIES}, got {self.families}")

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def home(self, family: str, *parts: str) -> Path:
        """Where a family's stages, eval and final model live: DIR for EVE, DIR/<family> for the others."""
        return self.path(*parts) if family == "eve" else self.path(family, *parts)

    @staticmethod
    def step_name(family: str, step: str) -> str:
        return step if family == "eve" else f"{family}-{step}"

    def steps(self) -> list[str]:
        family_steps = [self.step_name(f, s) for f in self.families for s in FAMILY_STEPS]
        return [*SHARED_STEPS, *family_steps, *(["language"] if set(self.families) - {"eve"} else []), "report"]

    # ---- bookkeeping ---------------------------------------------------------------------------
    def check_settings(self) -> None:
        """A run folder belongs to one plan and seed: resuming with others would mix two runs."""
        settings = {"seed": self.seed, "quick": self.quick, "plan": dataclasses.asdict(self.plan)}
        if self.families != ("eve",):  # (absent for EVE alone, so that earlier run folders still resume)
            settings["families"] = list(self.families)
        path = self.path("demo.json")
        if path.exists():
            before = json.loads(path.read_text())
            if before != json.loads(json.dumps(settings)):
                raise SystemExit(f"eve-demo: {self.out} holds a run with other settings ({path}); use another --out or delete it")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings, indent=2))

    def done(self, step: str) -> dict | None:
        marker = self.path("done", f"{step}.json")
        return json.loads(marker.read_text()) if marker.exists() else None

    def run(self, until: str | None = None) -> dict:
        """Every step not done yet, in order; with `until`, stop after that step (a later run
        without it goes on from there)."""
        self.check_settings()
        results = {}
        steps = self.steps()
        if until is not None:
            if until not in steps:
                raise SystemExit(f"eve-demo: --until {until!r} is not a step of this run; steps: {', '.join(steps)}")
            steps = steps[: steps.index(until) + 1]
        for i, step in enumerate(steps, 1):
            finished = self.done(step)
            if finished is not None:
                print(f"[{i}/{len(steps)}] {step}: done earlier ({finished['seconds']:.0f} s), skipped", flush=True)
                results[step] = finished
                continue
            print(f"[{i}/{len(steps)}] {step}", flush=True)
            start = time.time()
            family, _, name = step.rpartition("-")
            if name in FAMILY_STEPS:
                result = getattr(self, f"step_{name}")(results, family or "eve")
            else:
                result = getattr(self, f"step_{step}")(results)
            result["seconds"] = time.time() - start
            marker = self.path("done", f"{step}.json")
            marker.parent.mkdir(exist_ok=True)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(marker)  # atomic: a marker is never half-written
            results[step] = result
        return results

    @contextlib.contextmanager
    def quiet(self, name: str):
        """A tool's own chatter (INFO logs, printed JSON) goes to DIR/logs/<name>.log; its progress
        bars stay on the console."""
        self.path("logs").mkdir(exist_ok=True)
        with open(self.path("logs", f"{name}.log"), "a") as f, contextlib.redirect_stdout(f):
            handler = logging.StreamHandler(f)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger()
            saved = root.level, root.handlers[:]
            root.handlers[:] = [handler]
            root.setLevel(logging.INFO)
            try:
                yield
            finally:
                root.handlers[:] = saved[1]
                root.setLevel(saved[0])

    # ---- steps ---------------------------------------------------------------------------------
    def step_world(self, _) -> dict:
        world = self.path("world")
        shutil.rmtree(world, ignore_errors=True)  # short and not resumable: redo from clean
        p, L = self.plan, self.plan.image_long_side
        write_pool(world / "pool", p.pool_images, p.bad_images, self.seed, L)
        write_sft(world / "sft", p.sft_images, self.seed, L)
        for split in ("heldout", "unseen"):
            write_eval(world / "eval" / split, split, p.eval_images, self.seed, L)
        from demo.report import world_mosaic

        world_mosaic(self.seed, L, self.path("world.png"))
        return {"pool": p.pool_images + p.bad_images, "sft": p.sft_images, "eval_images_per_split": p.eval_images}

    def step_decoder(self, _) -> dict:
        from demo.stand_ins import make_decoder
        from eve.configuration_eve import FLAVORS

        out = self.path("stand_ins", "decoder")
        shutil.rmtree(out, ignore_errors=True)
        losses = make_decoder(out, FLAVORS["demo"]()["text_config"], self.plan.decoder_steps, self.seed)
        return {"path": str(out), "losses": losses}

    def step_teacher(self, _) -> dict:
        from transformers import AutoTokenizer

        from demo.stand_ins import make_teacher
        from eve.configuration_eve import EveConfig
        from eve.processing_eve import EveImageProcessor

        out = self.path("stand_ins", "teacher")
        shutil.rmtree(out, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(self.path("stand_ins", "decoder"))
        image_processor = EveImageProcessor.from_config(EveConfig.from_flavor("demo", **self.plan.flavor_overrides))
        losses = make_teacher(out, tokenizer, image_processor, self.plan.pool_images, self.plan.teacher_steps, self.seed,
                              self.plan.image_long_side)
        return {"path": str(out), "losses": losses}

    def step_curate(self, _) -> dict:
        """eve-curate, stage by stage, exactly as on the command line."""
        from data_curation.cli import main as curate
        from demo.datasets import POOL_SOURCE

        cur, pool, p = self.path("curation"), self.path("world", "pool"), self.plan
        commands = [
            ["scan", "--input", f"{POOL_SOURCE}={pool / 'images'}", "--shard-size", "500"],
            ["filter", "--min-side", "32", "--max-aspect", "4", "--dedup", "--workers", "0"],
            ["embed", "--model", str(self.path("stand_ins", "teacher")), "--batch-size", "128", "--workers", "0",
             "--device", "cpu"],
            ["cluster", "--k", str(p.clusters), "--niter", "20", "--seed", str(self.seed)],
            ["select", "--per-cluster", str(p.per_cluster)],
            ["caption", "--captions-file", str(pool / "pool_captions.jsonl")],
            ["export", "--webdataset"],
        ]
        with self.quiet("curate"):
            for argv in commands:
                curate([argv[0], "--out", str(cur), *argv[1:]])
        summary = json.loads((cur / "summary.json").read_text())
        return {"summary": summary, "manifest": str(cur / "export" / "train.jsonl")}

    def _stage_config(self, stage: int, results: dict, family: str) -> Path:
        p = self.plan
        steps = p.stage_steps[stage - 1]
        # max_length 384 cuts nothing: a square 96-px image is 157 tokens and the SFT chat around it
        # ~140. At 256, 18% of the conversations lost their last answer.
        common = dict(global_batch_size=p.batch_size, micro_batch_size=p.batch_size // 2, max_length=384, seed=self.seed,
                      zero_stage=3 if stage == 2 else 2, gradient_checkpointing=False, num_workers=1,
                      save_every=max(10, steps // 4), keep_last=2, log_every=5, total_steps=steps, warmup_ratio=0.05)
        if stage in (1, 2):
            data = [{"path": results["curate"]["manifest"]}]
        else:
            data = [{"path": str(self.path("world", "sft", "conversations.json"))}]
        cfg = self._eve2_stage(stage, family) if family != "eve" else {
            1: dict(init_from=str(self.path("stand_ins", "decoder")), init_is_decoder=True, flavor="demo",
                    flavor_overrides={**p.flavor_overrides, "teacher_model": str(self.path("stand_ins", "teacher"))},
                    # The paper's 4e-4. At 2e-3 the image tokens grow to >10x the norm of the word
                    # embeddings to make the frozen decoder listen, and stages 2-3 never learn colour.
                    template="plain", lr_vision=4e-4, lr_decoder=0.0),
            2: dict(init_from=str(self.path("stage1", "final")), template="plain", lr_vision=1e-3, lr_decoder=5e-4),
            3: dict(init_from=str(self.path("stage2", "final")), template="vicuna_v1", lr_vision=5e-4, lr_decoder=5e-4),
        }[stage]
        cfg.update(common, stage=stage, output_dir=str(self.home(family, f"stage{stage}")), data=data)
        path = self.home(family, "configs", f"stage{stage}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def _eve2_stage(self, stage: int, family: str) -> dict:
        """EVEv2's recipe in the demo's three stages, at v1's learning rates: the patch embedding
        alone (PAL is not part of EVEv2); the patch embedding and the vision experts, language
        weights frozen; then SFT of everything. Its area rule gets the same target side. Without
        experts (`eve2dense`), stage 2 trains the decoder itself at the experts' rate."""
        experts = family == "eve2"
        return {
            1: dict(init_from=str(self.path("stand_ins", "decoder")), init_is_decoder=True, flavor="eve2-demo",
                    flavor_overrides={"image_size": self.plan.model_image_size, "modality_experts": experts},
                    template="plain", pal=False, lr_vision=4e-4, lr_decoder=0.0, lr_experts=0.0),
            2: dict(init_from=str(self.home(family, "stage1", "final")), template="plain", pal=False, lr_vision=1e-3,
                    lr_decoder=0.0 if experts else 5e-4, lr_experts=5e-4 if experts else None),
            3: dict(init_from=str(self.home(family, "stage2", "final")), template="vicuna_v1", pal=False, lr_vision=5e-4,
                    lr_decoder=5e-4, lr_experts=5e-4 if experts else None),
        }[stage]

    def _train(self, stage: int, results: dict, family: str) -> dict:
        from train.config import TrainConfig
        from train.trainer import train

        config = self._stage_config(stage, results, family)
        with self.quiet(self.step_name(family, f"stage{stage}")):
            final = train(TrainConfig.load(config))
        metrics = [json.loads(line) for line in self.home(family, f"stage{stage}", "metrics.jsonl").read_text().splitlines() if line]
        return {"config": str(config), "final": str(final), "metrics": metrics}

    def step_stage1(self, results, family):
        return self._train(1, results, family)

    def step_stage2(self, results, family):
        return self._train(2, results, family)

    def step_stage3(self, results, family):
        result = self._train(3, results, family)
        final = self.home(family, "final")
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(result["final"], final)
        result["final"] = str(final)
        return result

    def step_eval(self, _, family) -> dict:
        """eve-eval run on both splits (VQAv2 format, official VQA accuracy); the sweep on held-out."""
        from eval.cli import main as evaluate

        out = {}
        for split in ("heldout", "unseen"):
            files = self.path("world", "eval", split)
            argv = ["run", "--model", str(self.home(family, "final")), "--task", "vqav2", "--questions", str(files / "questions.json"),
                    "--annotations", str(files / "annotations.json"), "--images", str(files / "images"),
                    "--out", str(self.home(family, "eval", split)), "--batch-size", "32", "--max-new-tokens", "5", "--device", "cpu"]
            if split == "heldout":
                size = self.plan.model_image_size
                # the world's backgrounds are near-white: a grey border would test the border, not the layout
                argv += ["--sweep", "--sweep-resolutions", f"{size // 2},{size}", "--sweep-fill", "edge"]
            with self.quiet(self.step_name(family, f"eval-{split}")):
                evaluate(argv)
            (run_dir,) = self.home(family, "eval", split).glob("vqav2-*")
            out[split] = {"run_dir": str(run_dir), "summary": json.loads((run_dir / "summary.json").read_text())}
        return out

    def step_language(self, _) -> dict:
        """Text next-token accuracy of the stand-in decoder, and of each family after stages 2 and 3."""
        from demo.language import held_out_texts, text_accuracy

        texts = held_out_texts(self.seed)
        out = {"decoder": text_accuracy(self.path("stand_ins", "decoder"), texts), "texts": len(texts)}
        for family in self.families:
            out[family] = {f"stage{n}": text_accuracy(self.home(family, f"stage{n}", "final"), texts) for n in (2, 3)}
        return out

    def step_report(self, results) -> dict:
        from demo.report import write_report

        return write_report(self, results)
