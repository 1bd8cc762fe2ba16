"""On every rank of a 2 x 1 emulated cluster: examples/train_moe.py's two-layer model with every technique on, in
float64, with the overlap schedule, and run as the unscheduled graph (``disable: ["schedule_overlap"]``, which
keeps numerics) by the eager target: the reference without Inductor's fusions. Rank 0 lowers the scheduled graph
by Inductor, rank 1 runs it by the eager target (half the compile time on two cores): the two exchange as one
job, so Inductor's lowering issues the collectives in the schedule's order, or the job would hang.

Prints one ``RESULT {json}`` line per rank: the largest difference of the loss, of each block's output and of
every gradient between the two.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_moe  # noqa: E402
from moe_ascend.runtime.launcher import end_process_group  # noqa: E402

ARGS = ["--layers", "2", "--width", "64", "--heads", "2", "--ffn", "64", "--experts", "4", "--top-k", "2",
        "--seq-len", "32", "--batch", "2"]


class Probed(train_moe.MoETransformer):
    """The model, returning each block's output beside the loss."""

    def forward(self, ids, targets):
        x, outputs = self.embed(ids) + self.position, []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return [torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)), *outputs]


def run(args, target: str, disable: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Probed(args, dist.group.WORLD, balance=True).double()
    options = train_moe.backend_options(train_moe.TECHNIQUES, "2", profile=False, target=target) | {"disable": disable}
    ids, targets = train_moe.batch_at(train_moe.stdlib_bytes(), 0, dist.get_rank(), args)
    outputs = torch.compile(model, backend="moe_ascend", options=options)(ids, targets)
    outputs[0].backward()
    return [o.detach() for o in outputs], [p.grad for p in model.parameters()]


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    args = train_moe.parser().parse_args(ARGS)
    lowered_by = "inductor" if dist.get_rank() == 0 else "eager"
    unscheduled, scheduled = run(args, "eager", ["schedule_overlap"]), run(args, lowered_by, [])
    differences = {kind: max(float((a - b).abs().max()) for a, b in zip(x, y))
                   for kind, x, y in zip(("outputs", "gradients"), unscheduled, scheduled)}
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "scheduled_by": lowered_by, **differences}), flush=True)
    end_process_group()


if __name__ == "__main__":
    main()
