"""What the digits examples share: scikit-learn's bundled digits data, the MLP, test accuracy, the loop."""
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm


def digits(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    t = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return t(x_tr, torch.float32), t(y_tr, torch.long), t(x_te, torch.float32), t(y_te, torch.long)


def mlp(seed: int, hidden: int = 128) -> nn.Module:
    """64 -> hidden -> hidden -> 10 with ReLUs, initialised from `seed`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def ring_allreduce_hook(state: dict, bucket) -> torch.futures.Future[torch.Tensor]:
    """Plain DDP all-reduce (a comm hook), adding to ``state["bytes"]`` what a ring all-reduce sends per rank:
    2 (W - 1) / W of the bucket."""
    w, buf = dist.get_world_size(), bucket.buffer()
    state["bytes"] += 2 * (w - 1) * buf.numel() * buf.element_size() // w
    return dist.all_reduce(buf.div_(w), async_op=True).get_future().then(lambda f: f.value()[0])


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_epochs(model, forward, optimizer, data, rank: int, world: int, args, monitor=None, desc: str = "",
                 backward=None) -> dict:
    """SGD on this rank's shard of the training set: `args.epochs` epochs of `args.batch_size` samples, the
    same order on every run (seeded by `args.seed`). `forward` is the model or its wrapper (DDP, a DeepSpeed
    engine), `backward(loss)` defaults to ``loss.backward()``. Logs
    train/loss per step and test/accuracy per epoch to `monitor`. Returns steps, seconds and final loss
    (an exponential moving average)."""
    x_tr, y_tr, x_te, y_te = data
    mine = torch.arange(rank, x_tr.shape[0], world)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = len(mine) // args.batch_size
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=desc, disable=rank != 0, leave=False)
    step, loss_ema, t0 = 0, None, time.perf_counter()
    for epoch in range(args.epochs):
        order = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(args.seed + epoch))]
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(forward(x_tr[idx]), y_tr[idx])
            loss.backward() if backward is None else backward(loss)
            optimizer.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            if monitor:
                monitor.log_scalar("train/loss", loss.item(), step)
            step += 1
            bar.update()
        if monitor:
            monitor.log_scalar("test/accuracy", accuracy(model, x_te, y_te), step)
    bar.close()
    return {"steps": step, "seconds": time.perf_counter() - t0, "final_loss": loss_ema}
