// The peer reference in the proxy benchmarks: Go's net/http/httputil.ReverseProxy, the engine
// of the KEDA HTTP Add-on's interceptor, with its transport tuned for keep-alive as the add-on
// does. Standard library only, so Debian's golang-go builds it offline.
//
//	go-proxy LISTEN_ADDR UPSTREAM_ADDR
package main

import (
	"fmt"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go-proxy LISTEN_ADDR UPSTREAM_ADDR")
		os.Exit(2)
	}
	target, err := url.Parse("http://" + os.Args[2])
	if err != nil {
		log.Fatalf("go-proxy: bad upstream address: %v", err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = 0
	transport.MaxIdleConnsPerHost = 1024
	proxy.Transport = transport
	log.Fatal(http.ListenAndServe(os.Args[1], proxy))
}
