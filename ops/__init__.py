"""Operations: what an operator configures and watches around the speech service."""
