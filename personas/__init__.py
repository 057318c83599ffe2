"""Who the agent is: persona definitions (YAML data), prompts, and the offline conversation mode."""
