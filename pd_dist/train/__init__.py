"""The student side: the student model under DeepSpeed (ZeRO or pipeline), checkpoints and the resume
contract, and the trainer loop."""
