"""Everything a teacher rank does, and nothing a student does: frozen inference (plain, ZeRO-3,
pipelined), serving sparse logits to students, and writing logits stores (generation, write-through,
dump). A teacher rank receives ready weights from the orchestration (pd_dist.run); nothing here imports
the student, an optimizer, the trainer or the orchestration."""
