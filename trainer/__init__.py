"""SAE trainer: capture activations from a transformers Llama, train an SAE with Ray Train (DDP), evaluate it,
and publish it with its card into the SAE registry the service watches. Run it with `python -m trainer`.

Importing the package has no side effects; Ray, torch and transformers load only inside the functions that use them.
"""
