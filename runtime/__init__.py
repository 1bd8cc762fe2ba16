"""What runs beside the compiled graph: topology, the reference MoE layer, balancing, the launcher."""
