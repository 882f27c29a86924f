"""The part of OpenAI's OpenAPI spec the e2e tests validate against, and its trimmer."""
