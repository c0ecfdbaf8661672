"""How the upper storeys (rag, agent, apps) reach models: a chat client and an embedding client,
each in-process (the engine in this process) or over HTTP (any OpenAI-compatible server: ours,
vLLM, llama.cpp, DeepSeek's API), behind the same two small interfaces."""

from pagoda.client.base import ChatClient, ChatReply, EmbeddingClient
from pagoda.client.http import HTTPChat, HTTPEmbeddings
from pagoda.client.local import LocalChat, LocalEmbeddings

__all__ = ["ChatClient", "ChatReply", "EmbeddingClient", "HTTPChat", "HTTPEmbeddings",
           "LocalChat", "LocalEmbeddings"]
