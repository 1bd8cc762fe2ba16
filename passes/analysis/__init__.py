"""Read-only analyses of FX graphs: op identity, collectives, MoE regions."""
