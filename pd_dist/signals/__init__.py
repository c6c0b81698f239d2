"""Where a student's teacher signal comes from: the `SignalSource`s (none, colocated, online, offline),
and the online client that asks teacher ranks for logits. The trainer holds a source, never a teacher."""
