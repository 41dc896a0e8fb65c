package relaytest

import (
	"fmt"
	"net/http"

	"github.com/gorilla/websocket"
)

// The handlers the relay tests' stand-in backends share: a streamed
// response in the form of a watch, and a WebSocket echo.

// WatchHandler answers 200 at once and writes each string from events as a
// line, flushed (the shape of a Kubernetes watch or logs -f), until events
// is closed or the client goes away.
func WatchHandler(events <-chan string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return
				}
				fmt.Fprintln(w, ev)
				w.(http.Flusher).Flush()
			case <-r.Context().Done():
				return
			}
		}
	}
}

// EchoWebSocket upgrades and sends every message back, prefix first, until
// the client closes.
func EchoWebSocket(prefix string) http.HandlerFunc { return EchoWebSocketN(prefix, -1) }

// EchoWebSocketN is EchoWebSocket for n messages, after which it ends its
// side cleanly (n < 0: no limit).
func EchoWebSocketN(prefix string, n int) http.HandlerFunc {
	up := websocket.Upgrader{}
	return func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		for i := 0; n < 0 || i < n; i++ {
			typ, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(typ, append([]byte(prefix), msg...)); err != nil {
				return
			}
		}
	}
}
