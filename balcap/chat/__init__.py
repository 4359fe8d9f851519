"""Chat models as judges: the backend protocol, an OpenAI-compatible HTTP backend, a balcap
policy as a local backend, a scripted backend for tests, the reply cache and lenient JSON
parsing. The reward judges (`rl/rewards/`) and the benchmark evaluators (`evals/`) both ask
their judge models through here."""
