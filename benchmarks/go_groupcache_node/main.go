// A golang/groupcache node for bench_cluster.py: the group "bench" with the values of
// bench_app.py (the key repeated to 100 bytes), served as GET /cache/bench/<key> beside
// groupcache's own peer route /_groupcache/, and the group's counters as GET /stats.
//
//	node -port 8001 -self http://127.0.0.1:8001 -peers http://127.0.0.1:8001,http://...
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"strings"

	"github.com/golang/groupcache"
)

const valueSize = 100

func value(key string) []byte {
	repeated := strings.Repeat(key, valueSize/len(key)+1)
	return []byte(repeated[:valueSize])
}

func main() {
	port := flag.String("port", "8001", "port to listen on (127.0.0.1)")
	self := flag.String("self", "", "this node's URL")
	peers := flag.String("peers", "", "every node's URL, comma-separated")
	flag.Parse()

	pool := groupcache.NewHTTPPoolOpts(*self, &groupcache.HTTPPoolOptions{})
	// As many idle keep-alive connections per peer as shmcache keeps (the default is 2).
	transport := &http.Transport{MaxIdleConnsPerHost: 16}
	pool.Transport = func(context.Context) http.RoundTripper { return transport }
	pool.Set(strings.Split(*peers, ",")...)
	http.Handle("/_groupcache/", pool)

	group := groupcache.NewGroup("bench", 64<<20, groupcache.GetterFunc(
		func(ctx context.Context, key string, dest groupcache.Sink) error {
			return dest.SetBytes(value(key))
		}))

	http.HandleFunc("/cache/bench/", func(w http.ResponseWriter, r *http.Request) {
		key := strings.TrimPrefix(r.URL.Path, "/cache/bench/")
		var data []byte
		if err := group.Get(r.Context(), key, groupcache.AllocatingByteSliceSink(&data)); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(data)
	})
	http.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(&group.Stats)
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	log.Fatal(http.ListenAndServe("127.0.0.1:"+*port, nil))
}
