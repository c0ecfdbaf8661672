// Server-Sent Events over fetch (POST bodies and headers, which EventSource cannot send).

/** Read a fetch body of Server-Sent Events, calling onData(payload) for each event's `data:`
 * lines; stops early (and cancels the body) when onData returns false. */
export async function readSSE(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data) === false) {
        reader.cancel().catch(() => {});
        return;
      }
    }
    if (done) return;
  }
}
