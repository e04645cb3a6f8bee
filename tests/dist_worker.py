"""One rank of the distributed tests (tests/distributed/test_distributed.py starts N of
these with MLX_RANK / MLX_HOSTFILE, as mlx.launch does).

    python tests/dist_worker.py MODE OUTDIR [MODEL_DIR]
"""
import os
import sys

import numpy as np


def main():
    mode, out = sys.argv[1], sys.argv[2]
    import mlxcy
    import mlxcy.distributed as dist
    g = dist.init(backend="ring", strict=True)
    r, n = g.rank, g.size
    save = lambda name, a: np.save(os.path.join(out, f"{name}.{r}.npy"), np.asarray(a))

    if mode == "ops":
        x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * (r + 1) - r
        with dist.deadline(20, "ops"):
            save("sum", dist.all_sum(mlxcy.array(x)).numpy())
            save("max", dist.all_max(mlxcy.array(x)).numpy())
            save("gather", dist.all_gather(mlxcy.array(x[:, :2])).numpy())
            save("isum", dist.all_sum(mlxcy.array(np.array([r + 1, 10 * r], np.int32))).numpy())
            # ring: each rank sends to its right neighbour, receives from the left
            right, left = (r + 1) % n, (r - 1) % n
            y = np.full((3,), 100 + r, np.float32)
            if r % 2 == 0:
                dist.send(mlxcy.array(y), right).eval()
                got = dist.recv((3,), mlxcy.float32, left).numpy()
            else:
                got = dist.recv((3,), mlxcy.float32, left).numpy()
                dist.send(mlxcy.array(y), right).eval()
            save("recv", got)
        save("size", np.array([n]))
    elif mode == "die":
        # rank 1 dies; the others must end with the watchdog's error, not hang
        if r == 1:
            os._exit(9)
        with dist.deadline(float(os.environ.get("T", "5")), "the test's all_sum"):
            dist.all_sum(mlxcy.ones((4,))).eval()
            dist.all_sum(mlxcy.ones((4,))).eval()
        save("survived", np.array([1]))
    elif mode == "hang":
        # rank 1 stays alive but never joins the collective
        if r == 1:
            import time
            time.sleep(60)
            return
        with dist.deadline(float(os.environ.get("T", "5")), "the test's all_sum"):
            dist.all_sum(mlxcy.ones((4,))).eval()
        save("survived", np.array([1]))
    elif mode == "logits":
        from mlxcy.distributed.parallel import load_pipeline, load_tensor_parallel
        plan = os.environ.get("PLAN", "tensor")
        load = load_tensor_parallel if plan == "tensor" else load_pipeline
        model = load(sys.argv[3], g, dtype="float32")
        ids = np.load(os.path.join(out, "ids.npy"))
        with dist.deadline(60, "the forward pass"):
            save("logits", model(ids).numpy())
            cache = model.make_cache()
            steps = [model(ids[:, :7], cache=cache).numpy()[:, -1]]
            for t in range(7, ids.shape[1]):
                steps.append(model(ids[:, t:t + 1], cache=cache).numpy()[:, -1])
            save("steps", np.stack(steps, 1))
        save("nbytes", np.array([model.nbytes()]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
