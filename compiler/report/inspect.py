"""``moe-ascend inspect DIR``: read a dump's summary.json back as a table (or as JSON)."""

from __future__ import annotations

from moe_ascend.compiler.report.summary import load_summary  # noqa: F401  (the CLI's and the tests' entry point)


def format_table(summary: dict) -> str:
    """One block per graph: its passes, then its MoE layers, collectives, estimated and measured exposed
    communication."""
    out = []
    for graph in summary["graphs"]:
        out.append(f"{graph['name']}  [{graph['stage']}, {graph['role']}]  {graph.get('nodes', '?')} nodes")
        out.append(f"  {'pass':<28}{'modified':>9}{'nodes':>14}{'added':>7}{'removed':>8}")
        for p in graph["passes"]:
            nodes = f"{p['nodes_before']}->{p['nodes_after']}"
            out.append(f"  {p['name']:<28}{str(p['modified']):>9}{nodes:>14}{p['nodes_added']:>7}"
                       f"{p['nodes_removed']:>8}")
            out += [f"      {said['level']}: {said['message']}" for said in p.get("said", [])]
        layers = graph.get("moe_layers", [])
        if layers:
            counts = ", ".join(
                f"layer {layer['layer']}: "
                + " ".join(f"{r}={len(layer[r])}" for r in ("router", "dispatch", "experts", "combine"))
                for layer in layers
            )
            out.append(f"  MoE layers: {len(layers)} ({counts})")
        else:
            out.append("  MoE layers: none")
        collectives = graph.get("collectives") or {}
        text = ", ".join(f"{kind} x{n} on group {g}" for kind, groups in collectives.items() for g, n in groups.items())
        out.append(f"  collectives: {text or 'none'}")
        sent = graph.get("exchange_bytes")
        if text and isinstance(sent, dict):
            out.append(f"  all-to-all bytes per run: inter-node {sent['inter_node']:,}, "
                       f"intra-node {sent['intra_node']:,}")
        elif text and sent:
            out.append(f"  all-to-all bytes per run: {sent} (counted at run time: moe_ascend.runtime.traffic)")
        if "ge_missing" in graph:
            missing = graph["ge_missing"]
            out.append("  Ascend GE converters: " + ("every op has one" if not missing else
                       "none for " + ", ".join(f"{op} ({why})" for op, why in missing.items())))
        for label in ("estimate", "measured"):
            timeline = graph.get(label)
            if timeline:
                hidden = timeline.get("hidden_fraction")
                out.append(
                    f"  {label}: step {timeline['step_s'] * 1e3:.3f} ms, exposed communication "
                    f"{timeline['exposed_comm_s'] * 1e3:.3f} ms of {timeline['comm_s'] * 1e3:.3f} ms"
                    + (f" (hidden {hidden:.2f})" if hidden is not None else "")
                )
        out.append("")
    return "\n".join(out)
