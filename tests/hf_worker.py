"""Runs under torchrun: the Hugging Face Trainer on a tiny GPT-2 built from a GPT2Config (nothing downloaded) on
generated tokens, with DeepSpeed (TrainingArguments(deepspeed=config)) or with plain DDP, with or without
DoubleSqueeze. The script imports nothing of ours in DeepSpeed mode: the config's "doublesqueeze" section alone
switches it on. Rank 0 writes OUT/result.json (losses, loopback bytes counted by the kernel over the training
steps after the first, residual norms); every rank writes OUT/rank{r}.pt (final weights and residuals).

    --mode deepspeed|deepspeed-zero2|deepspeed-zero3|ddp   --dsq (the section / the callback)   --steps N   --save-steps K   --resume
    --dsq-adamw (ddp: dsq.DoubleSqueezeAdamW as the Trainer's optimizer, with the callback)
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from checks import shut_down_and_exit


def net_bytes() -> int:
    """Bytes the loopback has carried in this network namespace (sent; each is also received)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


class Tokens(torch.utils.data.Dataset):
    """Sequences of 32 tokens, each a run counting up by a fixed stride from a random start: learnable."""

    def __init__(self, n: int = 512, length: int = 32, vocab: int = 128):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Bytes(TrainerCallback):
    """Loopback bytes from the end of step 1 to the end of training (the steps after the first)."""

    def __init__(self):
        self.start = self.end = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.start is None:
            self.start = net_bytes()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = net_bytes()


class Loaded(TrainerCallback):
    """After DoubleSqueezeCallback's on_train_begin (which loads a resumed run's residuals): this rank's residuals as
    loaded, to OUT/loaded{rank}.pt."""

    def __init__(self, callback, out: Path):
        self.callback, self.out = callback, out

    def on_train_begin(self, args, state, control, **kwargs):
        st = self.callback.state
        if st is None:                         # DoubleSqueezeAdamW: its momentum collective, once it exists
            st = self.callback.optimizer.momentum
        if st is not None:
            torch.save({"worker": st.worker_residuals(), "server": st.server_residuals()},
                       self.out / f"loaded{args.process_index}.pt")


class EngineResidual(TrainerCallback):
    """DeepSpeed modes: the engine's DoubleSqueeze worker residual (ZeRO-3: the parameters' flat forms one after
    another) when a checkpoint is saved (OUT/saved{rank}_step{N}.pt) and when training begins, after the Trainer
    loaded a resumed run's checkpoint (OUT/loaded{rank}.pt): this rank's own record of what it held."""

    def __init__(self, trainer, out: Path):
        self.trainer, self.out = trainer, out

    def _record(self, name):
        dsq = getattr(self.trainer.model_wrapped, "doublesqueeze", None)
        if dsq is not None and getattr(dsq, "residual", None) is not None:
            torch.save({"residual": dsq.residual.detach().clone(), "step": dsq.step}, self.out / name)

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(f"loaded{args.process_index}.pt")

    def on_save(self, args, state, control, **kwargs):
        self._record(f"saved{args.process_index}_step{state.global_step}.pt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["deepspeed", "deepspeed-zero2", "deepspeed-zero3", "ddp"], default="deepspeed")
    ap.add_argument("--dsq", action="store_true")
    ap.add_argument("--dsq-adamw", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--universal", action="store_true", help="resume from a universal checkpoint (ds_to_universal)")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    ds_config = None
    if args.mode.startswith("deepspeed"):
        ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 6}
        if args.mode == "deepspeed-zero2":      # the zero_optimization of the Trainer's documented ZeRO-2 config
            ds_config["zero_optimization"] = {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                                              "overlap_comm": True, "reduce_scatter": True,
                                              "reduce_bucket_size": "auto", "contiguous_gradients": True}
            ds_config["zero_allow_untested_optimizer"] = True
        if args.mode == "deepspeed-zero3":      # the zero_optimization of the Trainer's documented ZeRO-3 config
            ds_config["zero_optimization"] = {
                "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}
            ds_config["zero_allow_untested_optimizer"] = True
        if args.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        if args.dsq:
            ds_config["doublesqueeze"] = {"enabled": True, "compressor": "sign", "block_size": 1024, "guard": 0}
    training = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=8, max_steps=args.steps, learning_rate=3e-3,
        warmup_steps=0, logging_steps=1, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, save_only_model=False, report_to=[], disable_tqdm=True, seed=0,
        data_seed=0, use_cpu=True, ddp_backend="gloo", deepspeed=ds_config, dataloader_num_workers=0)
    optimizers = (None, None)
    if args.dsq_adamw:
        import dsq_plugins as dsq
        optimizers = (dsq.DoubleSqueezeAdamW(model.parameters(), lr=3e-3, warmup_steps=2,
                                             config=dsq.DoubleSqueezeConfig(compressor="sign", block_size=1024,
                                                                            guard=0.0)), None)
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), optimizers=optimizers)
    counter = Bytes()
    trainer.add_callback(counter)
    callback = None
    if args.mode.startswith("deepspeed") and args.dsq:
        trainer.add_callback(EngineResidual(trainer, out))
    if args.mode == "ddp" and args.dsq_adamw:
        from dsq_plugins.frontends.hf_trainer import DoubleSqueezeCallback
        callback = DoubleSqueezeCallback(trainer)
        trainer.add_callback(callback)
        trainer.add_callback(Loaded(callback, out))
    elif args.mode == "ddp" and args.dsq:
        import dsq_plugins as dsq
        from dsq_plugins.frontends.hf_trainer import DoubleSqueezeCallback
        callback = DoubleSqueezeCallback(trainer, dsq.DoubleSqueezeConfig(compressor="sign", block_size=1024))
        trainer.add_callback(callback)
        trainer.add_callback(Loaded(callback, out))
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    rank = training.process_index
    collective = callback.state if callback else getattr(trainer.model_wrapped, "doublesqueeze", None)
    if callback is not None and callback.optimizer is not None:
        collective = callback.optimizer.momentum      # what travels once the variance is frozen
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "dsq": collective is not None,
              "bytes_per_step": (counter.end - counter.start) / max(1, counter.steps - 1)}
    if args.mode == "deepspeed-zero3":              # whole parameters, gathered exactly (outside forward/backward)
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            record = {"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    else:
        record = {"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    if collective is not None:
        record.update(worker=collective.worker_residuals(), server=collective.server_residuals(),
                      step=collective.step)
        result.update(worker_residual_norm=collective.residual_norms()[0], step=collective.step,
                      payload=collective.totals.payload_bytes, dense=collective.totals.dense_bytes)
    torch.save(record, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    shut_down_and_exit()


if __name__ == "__main__":
    main()
