// The official Java producer (kafka-clients) with its DEFAULT partitioner (no partitioner.class),
// for the integration tests' partitioning check: it sends one record per key to TOPIC, as a Java
// service would, and prints the partition of each acknowledged send (from its RecordMetadata):
//
//   P <key hex> <partition>
//
// Keys come on stdin, one per line, hex-encoded (exact bytes, whatever their encoding; an empty
// line is the empty key). Run as a single-file source program on Kafka's classpath
// (tests/it/support.rs: java_producer_partitions):
//   java -cp "$LIB/*" tests/it/java/ProducePartitions.java BROKERS TOPIC TIMEOUT_MS < KEYS
// Exits non-zero (the exception on stderr) when a send fails or is not acknowledged within
// TIMEOUT_MS. Other output lines (logging) are ignored by the test.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class ProducePartitions {
    public static void main(String[] args) throws Exception {
        String brokers = args[0], topic = args[1];
        long timeout = Long.parseLong(args[2]);
        long deadline = System.currentTimeMillis() + timeout;
        HexFormat hex = HexFormat.of();
        List<byte[]> keys = new ArrayList<>();
        BufferedReader in =
            new BufferedReader(new InputStreamReader(System.in, StandardCharsets.US_ASCII));
        for (String line; (line = in.readLine()) != null; ) {
            keys.add(hex.parseHex(line));
        }
        Properties p = new Properties();
        p.put("bootstrap.servers", brokers);
        p.put("key.serializer", ByteArraySerializer.class.getName());
        p.put("value.serializer", ByteArraySerializer.class.getName());
        p.put("max.block.ms", String.valueOf(timeout));
        List<Future<RecordMetadata>> sent = new ArrayList<>();
        StringBuilder out = new StringBuilder();
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
            for (byte[] key : keys) {
                sent.add(producer.send(new ProducerRecord<>(topic, key, new byte[0])));
            }
            for (int i = 0; i < keys.size(); i++) {
                long left = Math.max(1, deadline - System.currentTimeMillis());
                RecordMetadata m = sent.get(i).get(left, TimeUnit.MILLISECONDS);
                out.append("P ").append(hex.formatHex(keys.get(i))).append(' ')
                    .append(m.partition()).append('\n');
            }
        }
        System.out.print(out);
        System.out.flush();
    }
}
