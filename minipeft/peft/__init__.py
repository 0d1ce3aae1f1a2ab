"""minipeft.peft."""
