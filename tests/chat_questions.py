"""Sixteen short chat questions with short answers: the requests that the batch-invariance tests send together
and one at a time (tests/serve/test_server.py through the server, tests/engine/test_batch_invariance.py through
the engine on every kernel tier)."""

QUESTIONS = ["Name three colors.", "What is 2+2?", "Say hello in French.", "What is the capital of Italy?",
             "Give me a word that rhymes with cat.", "Count from one to five.", "What is water made of?",
             "Name a planet.", "What day comes after Monday?", "Spell the word dog.", "Name a fruit.",
             "What is the opposite of hot?", "How many legs does a spider have?", "Name an ocean.",
             "What color is the sky?", "Write one word about the sea."]
